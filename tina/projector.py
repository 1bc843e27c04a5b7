"""Image prompts: example images of a class → one embedding in the generator's text space.

With a CLIP text encoder the image tower already lands in the text space, so the class embedding
is the mean of CLIP's image embeddings. The default encoder (all-MiniLM-L6-v2) has no image tower,
so a generator can carry its own `ImageProjector`: a small CNN trained on the zoo's dataset to map
an image onto the fixed text embedding of its class name. It travels inside the generator folder
("projector.*" tensors, bundle.json "projector"), so sampling stays offline.

This file is the runtime half (the network, loading it from a bundle, checking image prompts).
Training one and adding it to a generator folder is tina/training/projector.py:

    python -m tina.training.projector BUNDLE [epochs=5 width=16 ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tina.errors import TinaError
from tina.targets import ImageSpec, Normalize

PROJECTOR_FORMAT = "tina-projector/1"
ATTACH_COMMAND = "python -m tina.training.projector CHECKPOINT_FOLDER"


@dataclass
class ProjectorConfig:
    """How a projector is built and trained; saved (resolved) as the bundle's projector_config."""

    width: int = 16  # channels of the three conv stages: width, 2*width, 4*width
    pool: int = 2  # side of the grid the last feature map is average-pooled to (1 = global average pool)
    hidden: int = 256  # width of the MLP head
    max_input_size: int = 64  # larger images are downsampled to this first (bounds the CPU cost)
    temperature: float = 0.05  # of the cosine logits; text embeddings of related classes sit close together
    align_weight: float = 1.0  # weight of (1 - cos(image emb, own class text emb)) beside the cross-entropy
    epochs: int = 5
    batch_size: int = 256
    lr: float = 3e-3  # Adam, one-cycle schedule
    weight_decay: float = 1e-4
    max_shift: int = 2  # augmentation: random translation by up to this many pixels (edge-replicated)
    flip: bool = True  # augmentation: random horizontal flips (fine for clothes, clip art, photos; not digits)
    train_limit: int | None = None  # use only this many training images (tests, quick runs)
    test_limit: int | None = None  # evaluate on only this many test images
    held_out_classes: list[str] = field(default_factory=list)  # kept out of training: a true zero-shot check
    seed: int = 0
    # Filled in by training (they describe the trained weights, not choices):
    image: dict = field(default_factory=dict)  # ImageSpec.to_dict() of the inputs
    embed_dim: int = 0  # E, the text-embedding width
    text_encoder: str = ""  # name of the encoder whose space the outputs live in
    dataset: str = ""
    classes: list[str] = field(default_factory=list)  # the dataset classes, in label order

    def __post_init__(self):
        if self.width < 1 or self.pool < 1 or self.hidden < 1 or self.epochs < 0 or self.batch_size < 1 or self.max_input_size < 8:
            raise ValueError("width, pool, hidden, batch_size >= 1, epochs >= 0 and max_input_size >= 8 are required")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_shift < 0 or self.align_weight < 0:
            raise ValueError("max_shift and align_weight must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectorConfig":
        """From a bundle's projector_config; the keys written beside the config are skipped, others are errors."""
        d = {k: v for k, v in d.items() if k not in ("format", "metrics")}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise TinaError(f"projector config has unknown keys {unknown}; was it written by a newer Tina?")
        return cls(**d)


# ---- the network ----------------------------------------------------------------------------------


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: no running statistics, so train and eval behave the same
    # on one or two prompt images.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(inplace=True))


class ImageProjector(nn.Module):
    """normalize → 3 conv stages (GroupNorm + ReLU, 2 max-pools) → pool x pool average pool → MLP → unit vector."""

    def __init__(self, image: ImageSpec, embed_dim: int, width: int = 16, pool: int = 2, hidden: int = 256,
                 max_input_size: int = 64):
        super().__init__()
        self.image, self.embed_dim, self.max_input_size = image, embed_dim, max_input_size
        self.normalize = Normalize(image.mean, image.std)  # constants, not part of the state dict
        w = width
        self.features = nn.Sequential(
            _block(image.channels, w), nn.MaxPool2d(2),  # (N, w, S/2, S/2)
            _block(w, 2 * w), nn.MaxPool2d(2),  # (N, 2w, S/4, S/4)
            _block(2 * w, 4 * w),  # (N, 4w, S/4, S/4)
            # A 2x2 grid rather than one global average keeps where things are (a trouser's two legs,
            # a bag's handle): +5 points of Fashion-MNIST accuracy at the same cost.
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(),  # (N, 4w * pool^2)
        )
        self.head = nn.Sequential(nn.Linear(4 * w * pool * pool, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embed_dim))

    @classmethod
    def from_config(cls, cfg: ProjectorConfig) -> "ImageProjector":
        return cls(ImageSpec.from_dict(cfg.image), cfg.embed_dim, cfg.width, cfg.pool, cfg.hidden, cfg.max_input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W) float in [0, 1]
        if max(x.shape[-2:]) > self.max_input_size:
            s = self.max_input_size / max(x.shape[-2:])
            x = F.interpolate(x, scale_factor=s, mode="area")  # (N, C, <=M, <=M)
        h = self.features(self.normalize(x))  # (N, 4w * pool^2)
        return F.normalize(self.head(h), dim=-1)  # (N, E)


# ---- loading from a bundle, image prompts --------------------------------------------------------------------------------------


def load_projector(bundle) -> ImageProjector:
    """The bundle's projector, loaded strictly and checked against the bundle's encoder and images."""
    if bundle.projector_config.get("format") != PROJECTOR_FORMAT:
        raise TinaError(f"this checkpoint's projector has format {bundle.projector_config.get('format')!r}; this Tina "
                        f"reads {PROJECTOR_FORMAT!r}. Add a new one with: {ATTACH_COMMAND}")
    cfg = ProjectorConfig.from_dict(bundle.projector_config)
    if cfg.text_encoder and cfg.text_encoder != bundle.text_encoder:
        raise TinaError(f"this checkpoint's projector was trained for text encoder {cfg.text_encoder!r}, not "
                        f"{bundle.text_encoder!r}; add a new one with: {ATTACH_COMMAND}")
    spec = ImageSpec.from_dict(cfg.image)
    if cfg.embed_dim != bundle.vocab_emb.shape[1] or (spec.channels, spec.size) != (bundle.image.channels, bundle.image.size):
        raise TinaError(f"this checkpoint's projector does not match its generator (embedding width or image spec); "
                        f"add a new one with: {ATTACH_COMMAND}")
    model = ImageProjector.from_config(cfg)
    try:
        model.load_state_dict(bundle.projector, strict=True)
    except RuntimeError as e:
        raise TinaError(f"the checkpoint's projector weights do not match its config: {str(e).splitlines()[0]}") from None
    return model.eval()


def check_images(images, image: ImageSpec) -> torch.Tensor:
    """One class's example images → float (n, C, H, W) in [0, 1], or a TinaError saying what is wrong.

    Accepts a (n, C, H, W) or (C, H, W) tensor/array, or a list of them; uint8 is scaled by 1/255.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise TinaError("an image prompt needs at least one image")
        parts = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in images]
        images = torch.cat([p if p.ndim == 4 else p.unsqueeze(0) for p in parts])
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(0)  # one image
    want = f"(n, {image.channels}, {image.size}, {image.size})"
    if x.ndim != 4:
        raise TinaError(f"image prompts must be image tensors {want}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise TinaError("an image prompt needs at least one image")
    if x.shape[1] != image.channels:
        raise TinaError(f"this generator takes {image.channels}-channel images {want}, got {x.shape[1]} channels "
                        f"(shape {tuple(x.shape)}); load files with tina.images.load_images(paths, bundle.image)")
    if tuple(x.shape[-2:]) != (image.size, image.size):
        raise TinaError(f"this generator takes {image.size}x{image.size} images {want}, got {tuple(x.shape[-2:])}; "
                        "load files with tina.images.load_images(paths, bundle.image)")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise TinaError("image prompts must be floats in [0, 1] (divide 0-255 pixel values by 255)")
    return x


@torch.no_grad()
def embed_class_images(tina, images) -> torch.Tensor:
    """(E,) unit-norm class embedding from one class's example images: CLIP's image tower or the projector."""
    bundle = tina.bundle
    x = check_images(images, bundle.image)  # (n, C, H, W)
    try:
        encoder = tina.encoder
        tower = bool(getattr(encoder, "has_image_tower", False))
    except TinaError:
        if not bundle.projector:
            raise  # e.g. CLIP weights missing: that message says how to supply them
        tower = False
    if tower:
        z = encoder.encode_images(x)  # (n, E)
    elif bundle.projector:
        z = load_projector(bundle)(x).float()  # (n, E); tiny CNN, CPU is fine
    else:
        raise TinaError(
            f"image prompts need CLIP weights (a generator trained with an open_clip text encoder) or a checkpoint "
            f"with an image projector; this one uses {bundle.text_encoder!r} and has none. Add one with: {ATTACH_COMMAND}"
        )
    return F.normalize(z.mean(0), dim=-1).cpu()  # (E,)


