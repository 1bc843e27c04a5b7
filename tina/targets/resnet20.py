"""resnet20+linear: a CIFAR-style ResNet-20 (He et al. 2016, 3 stages x 3 basic blocks, 16/32/64
channels, BatchNorm; 0.27M parameters) as a frozen backbone with a personalized linear head over its
64 pooled features: the paper's ResNet-20 head setting on 32-px images, without timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tina.targets.base import ImageSpec, Target, register


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # option B of the paper: a 1x1 projection
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20Body(nn.Module):
    """conv 3x3 (16) -> 3 stages of 3 blocks (16, 32, 64 channels; strides 1, 2, 2) -> global average pool."""

    widths = (16, 32, 64)
    blocks = 3

    def __init__(self, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, self.widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(self.widths[0]), nn.ReLU())
        layers, cin = [], self.widths[0]
        for i, w in enumerate(self.widths):
            for j in range(self.blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)  # (N, 64)


@register
class ResNet20Linear(Target):
    name = "resnet20+linear"  # an exact name: found before the `<timm model>+linear` family
    generated = ("head.",)

    def body(self, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None):
        return ResNet20Body(image.channels), ResNet20Body.widths[-1]
