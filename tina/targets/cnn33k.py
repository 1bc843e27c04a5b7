"""cnn-33k: the cnn-5k layout, wider (16, 32, 64 channels); every parameter personalized.

The bigger whole-network target, like the paper's ConvNet-33k: 33.8K parameters at k=10 on 32-px RGB
images (23.6K in the body), 29.1K on 28-px grey images. Used to see how generation quality and cost
scale with the number of generated parameters (docs/targets.md).
"""

from __future__ import annotations

from tina.targets.base import ImageSpec, Target, register
from tina.targets.cnn5k import ConvBody


class CNN33kBody(ConvBody):
    widths = (16, 32, 64)


@register
class CNN33k(Target):
    name = "cnn-33k"
    generated = ("body.", "head.")

    def body(self, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None):
        return CNN33kBody(image.channels), CNN33kBody.feature_dim(image.size)
