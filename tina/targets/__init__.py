"""Target architectures: the networks whose weights Tina generates. One file per target, registered by name.

    cnn-5k              cnn5k.py        ~5K-parameter CNN, every parameter generated (the paper's small CNNs)
    cnn-33k             cnn33k.py       the same layout wider (~33K), every parameter generated
    resnet20+linear     resnet20.py     CIFAR ResNet-20 backbone (frozen, BatchNorm) + generated linear head
    <timm>+linear       timm_linear.py  any timm backbone (frozen) + generated linear head, e.g. resnet18+linear

A target is a `Target` subclass decorated with `@register` (base.py); docs/targets.md adds one in one file.
Every target builds a `TargetNet` (normalize -> body -> head) whose head row i is class i, so a generated
model takes float images in [0, 1] and nothing else.
"""

from tina.targets.base import HEAD, ImageSpec, Normalize, Target, TargetNet, get_target, register, register_family, registered
from tina.targets import cnn5k, cnn33k, resnet20, timm_linear  # noqa: F401 - registers the built-in targets
from tina.targets.cnn5k import CNN5kBody, ConvBody
from tina.targets.timm_linear import TimmBody

TARGETS = ("cnn-5k", "cnn-33k", "resnet20+linear", "resnet18+linear")  # examples for help texts; any timm model works with +linear

__all__ = ["HEAD", "ImageSpec", "Normalize", "Target", "TargetNet", "get_target", "register", "register_family", "registered",
           "CNN5kBody", "ConvBody", "TimmBody", "TARGETS"]
