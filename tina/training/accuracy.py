"""Accuracy of a k-class model on the real test images of a task's classes."""

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
