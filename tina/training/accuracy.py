"""Accuracy of a k-class model on the real test images of a task's classes, and the gain captured."""

from __future__ import annotations

import numpy as np
import torch


def task_test_set(dataset, class_ids: list[int], per_class: int | None = None, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the task's classes, labels remapped to task positions 0..k-1.

    `per_class` caps the images taken from each class (the first ones, so it is deterministic).
    """
    y_all = dataset.test_y if split == "test" else dataset.train_y
    idx, labels = [], []
    for pos, c in enumerate(class_ids):
        where = np.flatnonzero(y_all == c)
        if per_class is not None:
            where = where[:per_class]
        idx.append(where)
        labels.append(np.full(len(where), pos))
    idx = np.concatenate(idx)
    x, _ = dataset.tensors(split, idx)
    return x, torch.from_numpy(np.concatenate(labels)).long()


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = net(x[i : i + batch_size].to(device))
        correct += (logits.argmax(-1).cpu() == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)


# Below this, oracle - selection is within the noise of a few hundred test images per class (the
# Fashion-MNIST zoo's personalization gain is 0.019, clip art's 0.042), and the ratio below can take
# any value: a CIFAR stand-in run with oracle - selection = 0.001 reported a gain captured of -7.
MIN_ORACLE_GAIN = 0.01


def gain_captured(generated: float, oracle: float, selection: float, min_gain: float = MIN_ORACLE_GAIN) -> float | None:
    """(generated - selection) / (oracle - selection): the share of fine-tuning's gain over classifier
    selection that the generator reproduces. Arguments are mean accuracies over the same tasks (a ratio
    of means, not a mean of per-task ratios, which blow up on tasks where oracle ~ selection).
    None (undefined) when the oracle gains less than `min_gain` over selection."""
    if not oracle - selection >= min_gain:  # also catches NaN
        return None
    return (generated - selection) / (oracle - selection)
