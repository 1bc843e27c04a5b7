"""Generated tokens → flat weights → a strictly loaded classifier: the one path every caller takes.

`tina generate` (tina/sample.py), validation during training (tina/training/lit_module.py) and
evaluation (evaluation/) all turn sampled tokens into models here, so what validation scores is
what a user gets.
"""

from __future__ import annotations

import torch

from tina.anchor import SelectionAnchor
from tina.bundle import Bundle
from tina.errors import TinaError
from tina.layout import ParamLayout
from tina.targets import TargetNet, get_target


def tokens_to_flat(layout: ParamLayout, tokens: torch.Tensor, cond: torch.Tensor, anchor: SelectionAnchor | None = None) -> torch.Tensor:
    """Normalised tokens (>= T(k), C) of one k-class task with conditions cond (k, E) -> flat weights (P,).

    With an anchor the tokens hold the residual from soft classifier selection of each class (the
    anchor's weights for `cond`): the same origin for a prompt, an image prompt or a validation task."""
    k = cond.shape[0]
    flat = layout.denormalize(layout.detokenize(tokens[: layout.num_tokens(k)].float().cpu(), k), k)  # (P,)
    if anchor is not None:
        flat = flat + anchor.soft_origin(anchor.weights(cond.float().cpu()))
    return flat


def build_model(bundle: Bundle, flat: torch.Tensor, classes: list[str]) -> TargetNet:
    """A TargetNet carrying generated weights (+ the bundle's frozen base weights), loaded strictly."""
    return assemble(bundle.target, bundle.image, bundle.layout, flat, classes, bundle.base)


def assemble(target: str, image, layout, flat: torch.Tensor, classes: list[str], base: dict | None = None) -> TargetNet:
    """Generated flat vector (+ frozen base weights) → a strictly loaded TargetNet with `.classes`."""
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).sum().item()
        raise TinaError(f"the generated weights contain {bad} NaN/Inf values; try another --seed or fewer --guidance")
    net = get_target(target).build(len(classes), image)
    load_flat(net, layout, flat, base)
    net.classes = list(classes)
    return net.eval()


def load_flat(net: TargetNet, layout: ParamLayout, flat: torch.Tensor, base: dict | None = None) -> TargetNet:
    """Load one generated vector (P,) and the frozen base weights (parameters and buffers, e.g. a backbone's
    BatchNorm statistics) into `net`, strictly: a missing frozen tensor is an error, never a silently
    random backbone. `assemble` and evaluation's weight swapping (evaluation/scoring.py) both load here."""
    k = net.head.out_features
    state = layout.unflatten(flat.float().cpu(), k) | (base or {})
    missing = [n for n in layout.frozen if n not in state]
    if missing:
        raise TinaError(f"{layout.target}: {len(missing)} frozen tensors (e.g. {missing[0]}) are missing from the base weights")
    net.load_state_dict(state, strict=True)
    return net
