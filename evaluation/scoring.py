"""Accuracy of many models of one task on the task's real test images."""

from __future__ import annotations

import torch


@torch.no_grad()
def flat_accuracies(bundle, flats: torch.Tensor, k: int, x: torch.Tensor, y: torch.Tensor, eval_batch: int = 4096,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Accuracies (M,) of M models of one task, flats (M, P), on images x (n, C, H, W) with labels y (n,).

    Head-only layouts (frozen backbone): the features are computed once and all M heads applied as one
    matmul. Otherwise one network is built and its weights swapped per model, in channels-last memory
    (about 2x faster convolutions on CPU than NCHW; vmapped grouped convolutions were no faster).
    Models with non-finite weights score chance (1/k), as in validation.
    """
    from tina.targets import get_target

    M = flats.shape[0]
    finite = torch.isfinite(flats).all(dim=1)  # (M,)
    flats = torch.where(finite[:, None], flats, torch.zeros_like(flats))
    layout = bundle.layout
    net = get_target(bundle.target).build(k, bundle.image).to(device).eval()
    correct = torch.zeros(M)
    if layout.body_size == 0:  # every model shares the frozen body: one feature pass
        net.load_state_dict(layout.unflatten(flats[0], k) | bundle.base, strict=True)
        rows = flats.reshape(M, k, layout.head_dim).to(device)  # (M, k, D+1)
        for i in range(0, len(x), eval_batch):
            f = net.features(x[i : i + eval_batch].to(device))  # (b, D)
            logits = torch.einsum("bd,mkd->mbk", f, rows[..., :-1]) + rows[:, None, :, -1]  # (M, b, k)
            correct += (logits.argmax(-1).cpu() == y[i : i + eval_batch][None]).sum(1).float()
    else:
        net = net.to(memory_format=torch.channels_last)
        chunks = [(x[i : i + eval_batch].to(device).contiguous(memory_format=torch.channels_last), y[i : i + eval_batch])
                  for i in range(0, len(x), eval_batch)]
        for j in range(M):
            net.load_state_dict(layout.unflatten(flats[j], k) | bundle.base, strict=True)
            for xb, yb in chunks:
                correct[j] += (net(xb).argmax(-1).cpu() == yb).sum().item()
    acc = correct / max(len(x), 1)
    return torch.where(finite, acc, torch.full_like(acc, 1.0 / k))


