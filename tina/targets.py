"""Target architectures: the networks whose weights Tina generates.

One registry shared by `zoo_builder` (which trains them) and `tina` (which generates them).
Every target is a `TargetNet`: a feature extractor (`body`) followed by a linear `head` whose
output i is the task's class i. Preprocessing (normalisation) lives inside the module, so a
generated model takes float images in [0, 1] and nothing else.

Targets:
  cnn-5k            a ~5K-parameter CNN; every parameter is personalized (the paper's CIFAR setting)
  <timm name>+linear a frozen timm backbone with a personalized linear head (the paper's ResNet head)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tina.errors import TinaError


@dataclass(frozen=True)
class ImageSpec:
    """What a target needs to know about its input images, and how a user's image file becomes one
    (tina/images.py reads `size`, `channels`, `background` and `crop`; the model applies `mean`/`std`)."""

    channels: int  # 1 for Fashion-MNIST, 3 for RGB
    size: int  # square side in pixels
    mean: tuple[float, ...]  # per-channel normalisation, applied inside the model
    std: tuple[float, ...]
    # Grey level (0-255) around an image that does not fill the square. 0 marks a light-on-dark
    # dataset (Fashion-MNIST): a user's image whose border is light is inverted to match it.
    background: int = 255
    crop: bool = False  # trim blank margins before resizing (the clip-art renderer does)

    def __post_init__(self):
        if self.channels not in (1, 3) or self.size < 1 or not 0 <= self.background <= 255:
            raise ValueError(f"ImageSpec needs channels 1 or 3, size >= 1 and background in [0, 255], got {self}")

    def __post_init__(self):
        if not all(s > 0 for s in self.std):  # also catches NaN: the model divides by std
            raise TinaError(f"image std must be > 0 for every channel, got {list(self.std)}")

    def to_dict(self) -> dict:
        return {"channels": self.channels, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                "background": self.background, "crop": self.crop}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        # Files written before `background` existed: grey meant Fashion-MNIST (light on black).
        background = int(d.get("background", 0 if int(d["channels"]) == 1 else 255))
        return cls(int(d["channels"]), int(d["size"]), tuple(d["mean"]), tuple(d["std"]), background,
                   bool(d.get("crop", False)))


class Normalize(nn.Module):
    """(x - mean) / std with constants as non-persistent buffers (never part of the generated vector)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class TargetNet(nn.Module):
    """normalize → body → head. `classes` names output i; filled in for generated models."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int, image: ImageSpec):
        super().__init__()
        self.normalize = Normalize(image.mean, image.std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.image = image
        self.classes: list[str] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, k)


class CNN5kBody(nn.Module):
    """Three 3x3 convs (8, 16, 16 channels) with ReLU, each followed by a 2x2 max-pool, then flatten.

    The last feature map keeps its spatial layout (3x3 on 28 px, 4x4 on 32 px) instead of a global
    average: with only ~5K parameters, where a stroke is matters (a global average pool left the
    generic Fashion-MNIST model at 77% test accuracy; this layout reaches 86% at the same size).
    No normalisation layers: BatchNorm running statistics could not be generated, and at this size
    plain convs train well from the generic initialisation.
    """

    widths = (8, 16, 16)

    def __init__(self, in_channels: int):
        super().__init__()
        c1, c2, c3 = self.widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)

    @classmethod
    def feature_dim(cls, size: int) -> int:
        return cls.widths[-1] * (size // 8) ** 2

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # (N, 8, H/2, W/2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # (N, 16, H/4, W/4)
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)  # (N, 16, H/8, W/8)
        return x.flatten(1)  # (N, D) with D = 16 * (H/8)^2


class TimmBody(nn.Module):
    """A timm backbone without its classifier; pretrained only when weights are available locally."""

    def __init__(self, name: str, in_channels: int, pretrained: bool = False, checkpoint: str | None = None):
        super().__init__()
        import timm

        kwargs = {"num_classes": 0, "in_chans": in_channels}
        if checkpoint:
            kwargs["pretrained_cfg_overlay"] = {"file": checkpoint}
        try:
            self.net = timm.create_model(name, pretrained=pretrained or bool(checkpoint), **kwargs)
        except RuntimeError as e:  # unknown model name
            raise TinaError(f"timm has no model {name!r}: {e}") from e
        self.num_features = self.net.num_features

    def forward(self, x):
        return self.net(x)  # (N, D)


@dataclass(frozen=True)
class TargetSpec:
    """A named architecture: how to build it and which of its parameters are generated."""

    name: str
    # Parameter-name prefixes that are generated. The head is always generated; for timm
    # targets the body is frozen and travels with the generator as its base weights.
    generated_prefixes: tuple[str, ...] = field(default=("body.", "head."))

    @property
    def timm_name(self) -> str | None:
        return self.name[: -len("+linear")] if self.name.endswith("+linear") else None

    def build(self, num_classes: int, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None) -> TargetNet:
        if self.name == "cnn-5k":
            body = CNN5kBody(image.channels)
            return TargetNet(body, CNN5kBody.feature_dim(image.size), num_classes, image)
        body = TimmBody(self.timm_name, image.channels, pretrained=pretrained, checkpoint=checkpoint)
        return TargetNet(body, body.num_features, num_classes, image)

    def is_generated(self, param_name: str) -> bool:
        return any(param_name.startswith(p) for p in self.generated_prefixes)


def get_target(name: str) -> TargetSpec:
    """Look a target up by name: `cnn-5k` or `<timm model>+linear` (e.g. `resnet18+linear`)."""
    if name == "cnn-5k":
        return TargetSpec("cnn-5k")
    if name.endswith("+linear") and len(name) > len("+linear"):
        return TargetSpec(name, generated_prefixes=("head.",))
    raise TinaError(f"unknown target {name!r}; choose 'cnn-5k' or '<timm model>+linear' (e.g. 'resnet18+linear')")


TARGETS = ("cnn-5k", "resnet18+linear")  # names offered as CLI choices; any timm model works with +linear
