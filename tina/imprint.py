"""Few-shot head rows: a class given by example images gets a head row built from their features.

The generator writes a class's head row from its text (or projected image) embedding, so a class it
never heard of gets a row that does not recognise it (strict unseen classes: at chance, see
evaluation/unseen_classes.py). Weight imprinting (Qi, Brown & Lowe, CVPR 2018) instead sets the row
to the direction of the class's mean feature under the generated body, and needs no training:

    w_c = r * mean_i f(x_i) / |mean_i f(x_i)|       r: the mean norm of the other (generated) rows
    b_c = the bias at which class c wins on `win_rate` of its own example images against the
          best of the other classes (so the new row lands on the generated rows' logit scale);
          a win_rate above 1 wins all of them with a margin of (win_rate - 1) standard deviations
          of that gap

Only the imprinted classes' rows change; the body and every other row stay as generated. `win_rate`
was chosen on val tasks with known classes only (`python -m evaluation.unseen_classes --val`),
never on the unseen-class test split.
"""

from __future__ import annotations

import torch

# Share of a class's own example images its imprinted row must win. Chosen on val: the shipped
# fashion-mnist generator on 12 val tasks of configs/zoo/fashion_mnist_heldout.yaml, 5 images, gave
# overall accuracy 0.821 / 0.853 / 0.868 / 0.833 / 0.777 for 0.5 / 0.75 / 1.0 / 1.5 / 2.0
# (`python -m evaluation.unseen_classes --val --zoo zoos/fashion_mnist_heldout --checkpoint fashion-mnist --tasks 12`).
WIN_RATE = 1.0


@torch.no_grad()
def imprint(net, images: dict[int, torch.Tensor], win_rate: float = WIN_RATE) -> None:
    """Replace net.head's rows {class index: (n, C, H, W) example images in [0, 1]} in place."""
    if not images:
        return
    head = net.head
    k = head.out_features
    was_training = net.training
    net.eval()
    others = [i for i in range(k) if i not in images]
    ref = others or list(range(k))  # every class imprinted: keep the generated rows' scale
    radius, mean_bias = head.weight[ref].norm(dim=1).mean(), head.bias[ref].mean()
    feats = {c: net.features(x.float()) for c, x in images.items()}  # each (n, D)
    for c, f in feats.items():
        mean = f.mean(0)
        head.weight[c] = radius * mean / mean.norm().clamp_min(1e-8)
    for c, f in feats.items():
        if not others:
            head.bias[c] = mean_bias
            continue
        own = f @ head.weight[c]  # (n,) without bias
        rival = head(f)[:, others].max(dim=1).values  # (n,) the best generated class on these images
        # bias b wins image i when own_i + b > rival_i: the win_rate quantile of rival - own
        gap = rival - own
        extra = (win_rate - 1) * gap.std() if win_rate > 1 and len(gap) > 1 else 0.0
        head.bias[c] = torch.quantile(gap, min(win_rate, 1.0)) + extra
    net.train(was_training)
