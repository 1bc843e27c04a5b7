"""Helpers for tests and demos that need a generator folder without training one."""

from __future__ import annotations

from pathlib import Path

import torch

from tina.bundle import Bundle, save_bundle
from tina.diffusion import DiffusionConfig, scheduler_config
from tina.layout import layout_for
from tina.model import build_dit
from tina.targets import ImageSpec

FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_IMAGE = ImageSpec(1, 28, (0.286,), (0.353,), background=0)


def random_bundle(path: str | Path, classes: list[str] = FASHION_CLASSES, image: ImageSpec = FASHION_IMAGE,
                  target: str = "cnn-5k", size: str = "DiT-T", text_encoder: str = "minilm", k_max: int = 10,
                  seed: int = 0) -> Path:
    """An untrained (randomly initialised, non-zero output) generator bundle with a real vocabulary."""
    from tina.text import get_text_encoder

    torch.manual_seed(seed)
    enc = get_text_encoder(text_encoder)
    layout = layout_for(target, image, 128)
    dit = build_dit(size, token_size=layout.token_size, n_body_tokens=layout.n_body_tokens,
                    tokens_per_class=layout.tokens_per_class, cond_dim=enc.dim)
    with torch.no_grad():  # leave adaLN-Zero so samples depend on the text
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    bundle = Bundle(dit=dit, layout=layout, scheduler_config=scheduler_config(DiffusionConfig()), target=target, image=image,
                    dataset="fashion-mnist", text_encoder=enc.name, k_max=k_max, vocab=list(classes),
                    vocab_emb=enc.encode(list(classes)).float(), meta={"sampling": {"steps": 10, "sampler": "ddim", "guidance": 1.0}})
    return save_bundle(bundle, path)
