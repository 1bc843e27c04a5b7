"""Predictions and accuracy of many models of one task on the task's real test images."""

from __future__ import annotations

import torch


@torch.no_grad()
def flat_probs(bundle, flats: torch.Tensor, k: int, x: torch.Tensor, eval_batch: int = 4096,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """Class probabilities (M, n, k) of M models of one task, flats (M, P), on images x (n, C, H, W).

    Head-only layouts (frozen backbone): the features are computed once and all M heads applied as one
    matmul. Otherwise one network is built and its weights swapped per model, in channels-last memory
    (about 2x faster convolutions on CPU than NCHW; vmapped grouped convolutions were no faster).
    Models with non-finite weights predict the uniform distribution.
    """
    from tina.weights import load_flat
    from tina.targets import get_target

    M = flats.shape[0]
    finite = torch.isfinite(flats).all(dim=1)  # (M,)
    flats = torch.where(finite[:, None], flats, torch.zeros_like(flats))
    layout = bundle.layout
    net = get_target(bundle.target).build(k, bundle.image).to(device).eval()
    probs = torch.empty(M, len(x), k)
    if layout.body_size == 0:  # every model shares the frozen body: one feature pass
        load_flat(net, layout, flats[0], bundle.base)
        rows = flats.reshape(M, k, layout.head_dim).to(device)  # (M, k, D+1)
        for i in range(0, len(x), eval_batch):
            f = net.features(x[i : i + eval_batch].to(device))  # (b, D)
            logits = torch.einsum("bd,mkd->mbk", f, rows[..., :-1]) + rows[:, None, :, -1]  # (M, b, k)
            probs[:, i : i + eval_batch] = logits.softmax(-1).cpu()
    else:
        net = net.to(memory_format=torch.channels_last)
        chunks = [x[i : i + eval_batch].to(device).contiguous(memory_format=torch.channels_last) for i in range(0, len(x), eval_batch)]
        for j in range(M):
            load_flat(net, layout, flats[j], bundle.base)
            probs[j] = torch.cat([net(xb).softmax(-1).cpu() for xb in chunks])  # (n, k)
    probs[~finite] = 1.0 / k
    return probs


def accuracies(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracies (M,) from probabilities (M, n, k); a uniform prediction (non-finite weights) scores chance (1/k)."""
    k = probs.shape[-1]
    uniform = (probs == 1.0 / k).all(-1).all(-1)  # (M,)
    acc = (probs.argmax(-1) == y[None]).float().mean(-1) if probs.shape[1] else torch.zeros(probs.shape[0])
    return torch.where(uniform, torch.full_like(acc, 1.0 / k), acc)


def flat_accuracies(bundle, flats: torch.Tensor, k: int, x: torch.Tensor, y: torch.Tensor, eval_batch: int = 4096,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Accuracies (M,) of M models of one task, flats (M, P), on images x with labels y (n,)."""
    return accuracies(flat_probs(bundle, flats, k, x, eval_batch, device), y)


def disagreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of images on which two models' top predictions differ: probabilities (n, k) each."""
    return float((a.argmax(-1) != b.argmax(-1)).float().mean()) if len(a) else 0.0
