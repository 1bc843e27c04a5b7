"""What every target shares: the image spec, the TargetNet wrapper, the Target base class and the registry.

A target is one file in this package: a `Target` subclass that says how to build its body and which
parameters are generated, decorated with `@register`. Everything else (zoo builder, layout, generator,
export, reload) works from that object; see docs/targets.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tina.errors import TinaError

HEAD = "head."


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
    """normalize → body → head. `classes` names output i (filled in for generated models); `target` is
    the registered name of the architecture (set by Target.build; export.py writes it into config.json)."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int, image: ImageSpec, target: str = ""):
        super().__init__()
        self.normalize = Normalize(image.mean, image.std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.image = image
        self.target = target
        self.classes: list[str] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, k)


class Target:
    """A named architecture. Subclasses set `name` (and `generated`) and implement `body`.

    `generated`: parameter-name prefixes whose values the generator produces. The head ("head.") is
    always generated; ("body.", "head.") personalizes the whole network (the paper's small CNNs),
    ("head.",) personalizes a linear head on a frozen backbone (the paper's ResNet/ViT setting).
    Everything else in the state dict, parameters and buffers (BatchNorm running statistics), is
    frozen: it comes from the zoo's generic model and travels with the generator as its base weights.
    A generated part may not hold buffers (running statistics cannot be generated).
    """

    name: str = ""
    generated: tuple[str, ...] = ("body.", HEAD)

    def body(self, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None) -> tuple[nn.Module, int]:
        """The feature extractor for `image` and its feature dimension D (features are (N, D))."""
        raise NotImplementedError

    # ---- derived: no need to override ------------------------------------------------------------

    @property
    def head_only(self) -> bool:
        """True when only the head is generated (a frozen backbone: features can be computed once)."""
        return tuple(self.generated) == (HEAD,)

    def build(self, num_classes: int, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None) -> TargetNet:
        body, feature_dim = self.body(image, pretrained=pretrained, checkpoint=checkpoint)
        net = TargetNet(body, feature_dim, num_classes, image, self.name)
        bad = [n for n, _ in net.named_buffers() if self.is_generated(n) and n in net.state_dict()]
        if bad:
            raise TinaError(f"target {self.name}: generated modules hold buffers {bad[:3]} (running statistics cannot be "
                            "generated); freeze those modules or drop their normalisation layers")
        return net

    def is_generated(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.generated)

    def frozen_names(self, net: nn.Module) -> list[str]:
        """State-dict entries that are not generated: parameters and persistent buffers, in state-dict order."""
        return [n for n in net.state_dict() if not self.is_generated(n)]

    def export(self, net: TargetNet) -> torch.export.ExportedProgram:
        """torch.export of a built model, preprocessing inside, with a dynamic batch dimension."""
        im = net.image
        example = torch.rand(2, im.channels, im.size, im.size)
        batch = torch.export.Dim("batch", min=1, max=65536)
        return torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, generated={self.generated})"


_TARGETS: dict[str, Target] = {}
_FAMILIES: list[tuple[str, Callable[[str], Target], str]] = []  # (name suffix, factory(name), help)


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: make `cls.name` a target. A name may be registered once."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if cls.name in _TARGETS and type(_TARGETS[cls.name]) is not cls:
        raise ValueError(f"target {cls.name!r} is already registered by {type(_TARGETS[cls.name]).__name__}")
    _TARGETS[cls.name] = cls()
    return cls


def register_family(suffix: str, factory: Callable[[str], Target], help: str) -> None:
    """Targets named by a pattern: any name ending in `suffix` (e.g. `<timm model>+linear`) -> factory(name)."""
    _FAMILIES.append((suffix, factory, help))


def get_target(name: str) -> Target:
    """A registered target by name; exact names first, then name families (e.g. `resnet18+linear`)."""
    if name in _TARGETS:
        return _TARGETS[name]
    for suffix, factory, _ in _FAMILIES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return factory(name)
    families = ", ".join(h for _, _, h in _FAMILIES)
    raise TinaError(f"unknown target {name!r}; choose one of {', '.join(sorted(_TARGETS))}" + (f" or {families}" if families else ""))


def registered() -> list[str]:
    """Names of the registered (exact-name) targets, in registration order."""
    return list(_TARGETS)
