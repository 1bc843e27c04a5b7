"""`<timm model>+linear`: a frozen timm backbone with a personalized linear head (the paper's second
setting). Any timm model name works, e.g. `resnet18+linear` (11.2M frozen parameters and BatchNorm
statistics, 512 features). Offline there are no pretrained weights: the zoo builder then trains the
backbone itself as the generic model (zoo_builder/generic.py); `generic.pretrained=true` or
`generic.checkpoint=FILE` start from weights the user has.
"""

from __future__ import annotations

from torch import nn

from tina.errors import TinaError
from tina.targets.base import ImageSpec, Target, register_family

SUFFIX = "+linear"


class TimmBody(nn.Module):
    """A timm backbone without its classifier; pretrained only when weights are available locally."""

    def __init__(self, name: str, in_channels: int, pretrained: bool = False, checkpoint: str | None = None):
        super().__init__()
        import timm  # lazily: `from tina import Tina` must not import timm

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


class TimmLinear(Target):
    generated = ("head.",)

    def __init__(self, name: str):
        self.name = name

    @property
    def timm_name(self) -> str:
        return self.name[: -len(SUFFIX)]

    def body(self, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None):
        body = TimmBody(self.timm_name, image.channels, pretrained=pretrained, checkpoint=checkpoint)
        return body, body.num_features


register_family(SUFFIX, TimmLinear, "'<timm model>+linear' (e.g. 'resnet18+linear')")
