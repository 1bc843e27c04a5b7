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
                  seed: int = 0, dataset: str = "fashion-mnist") -> Path:
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
                    dataset=dataset, text_encoder=enc.name, k_max=k_max, vocab=list(classes),
                    vocab_emb=enc.encode(list(classes)).float(), meta={"sampling": {"steps": 10, "sampler": "ddim", "guidance": 1.0}})
    return save_bundle(bundle, path)


# ---- stand-in files for the paper setting (CIFAR-100 + an open_clip checkpoint) -------------------

CIFAR100_FIRST_CLASSES = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
                          "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel"]  # fmt: skip


def write_stand_in_cifar100(root: str | Path, classes: int = 12, train_per_class: int = 30, test_per_class: int = 10,
                            seed: int = 0) -> Path:
    """ROOT/cifar-100-python/{train,test,meta} in CIFAR-100's own format (Python pickles of dicts with
    bytes keys), with `classes` learnable classes: a coloured square per class on a noisy background.
    Not the official files, so loading them needs dataset.verify=false."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    names = CIFAR100_FIRST_CLASSES[:classes]
    colours = rng.integers(0, 256, (classes, 3))
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(per_class, label):
        y = np.repeat(np.arange(classes), per_class)
        x = rng.integers(0, 80, (len(y), 32, 32, 3))
        for i, c in enumerate(y):
            r, col = rng.integers(4, 14, 2)
            x[i, r : r + 14, col : col + 14] = colours[c]
        data = x.astype(np.uint8).transpose(0, 3, 1, 2).reshape(len(y), 3072)  # CIFAR stores CHW rows
        return {b"batch_label": label.encode(), b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(),
                b"filenames": [f"{i}.png".encode() for i in range(len(y))], b"data": data}

    parts = {"train": batch(train_per_class, "training batch 1 of 1"), "test": batch(test_per_class, "testing batch 1 of 1"),
             "meta": {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"stand-in"] * 20}}
    for name, obj in parts.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # the protocol of the official Python 2 files
    return folder


def write_random_open_clip(path: str | Path, arch: str, seed: int = 0) -> Path:
    """A randomly initialised open_clip state dict for `arch`, saved the way open_clip's hub files are."""
    import open_clip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    torch.save(model.state_dict(), path)
    return path
