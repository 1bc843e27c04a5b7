"""Generated models as flat vectors: many tasks per batched call, and the training images of image prompts."""

from __future__ import annotations

import numpy as np
import torch

from tina.errors import TinaError


def sample_images(dataset, class_ids: list[int], n: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """n random training images per class (image prompts)."""
    y = np.asarray(dataset.train_y)
    out = []
    for c in class_ids:
        idx = np.flatnonzero(y == c)
        x, _ = dataset.tensors("train", np.sort(rng.choice(idx, min(n, len(idx)), replace=False)))
        out.append(x)
    return out


def generate_flats(tina, items: list[tuple], seed: int, batch_size: int, bar=None, **sampling) -> dict:
    """items: (item_id, Task). All of them in batched generate_tasks calls (grouped by k); item_id → flat.

    sampling: steps, guidance, sampler (None: the checkpoint's). A task whose weights come out non-finite
    gets a NaN vector (it scores chance)."""
    items = sorted(items, key=lambda it: len(it[1].classes))
    out = {}

    def run(chunk):
        try:
            nets = tina.generate_tasks([t for _, t in chunk], seed=seed, **sampling)
        except TinaError:  # non-finite weights somewhere: narrow down, the bad task scores chance
            if len(chunk) == 1:
                out[chunk[0][0]] = torch.full((tina.bundle.layout.num_params(len(chunk[0][1].classes)),), float("nan"))
                return
            half = len(chunk) // 2
            run(chunk[:half])
            run(chunk[half:])
            return
        for (key, _), net in zip(chunk, nets):
            out[key] = tina.bundle.layout.flatten(net.state_dict())

    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        run(chunk)
        if bar is not None:
            bar.update(len(chunk))
    return out
