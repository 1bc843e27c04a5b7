"""The zero-shot classifier a checkpoint's image projector implies: image -> text space -> nearest class name.

A checkpoint with an image projector (tina/projector.py) can classify without generating anything: embed
each test image, pick the task class whose plain-name text embedding is nearest (cosine). It is the fair
"no weights generated" rival of a generated model, so it is reported with its size beside the generated one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ZeroShot:
    """The projector of a bundle, loaded once; accuracy of a task from its class-name embeddings."""

    def __init__(self, bundle):
        from tina.projector import load_projector

        self.net = load_projector(bundle)
        self.parameters = sum(p.numel() for p in self.net.parameters())

    @torch.no_grad()
    def accuracy(self, class_emb: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
        """class_emb (k, E) plain-name embeddings in task order; x (n, C, H, W) images, y (n,) task labels."""
        cls = F.normalize(class_emb.float(), dim=-1)  # (k, E)
        pred = torch.cat([(self.net(x[i : i + batch]) @ cls.T).argmax(-1) for i in range(0, len(x), batch)])  # (n,)
        return float((pred == y).float().mean()) if len(y) else 0.0


def sizes(bundle, zeroshot: ZeroShot | None, k: int) -> dict:
    """Parameters a deployed model needs: a generated k-class model vs the projector + k text embeddings."""
    out = {"k": k, "generated_model": bundle.layout.num_params(k) + sum(v.numel() for v in bundle.base.values())}
    if zeroshot is not None:
        out["zeroshot"] = zeroshot.parameters + k * bundle.vocab_emb.shape[1]
    return out
