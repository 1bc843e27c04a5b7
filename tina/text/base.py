"""The text-encoder interface (strings -> (N, E) unit embeddings) and the offline rule every backend follows."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
import torch.nn.functional as F

from tina.errors import TinaError

log = logging.getLogger(__name__)

ENCODER_FORMS = (
    "'minilm', 'open_clip:<arch>/<pretrained tag>' (e.g. open_clip:ViT-B-32/openai), "
    "'open_clip:<arch>/<checkpoint path containing a slash>' (e.g. open_clip:ViT-B-32//abs/path/ckpt.bin "
    "or open_clip:ViT-B-32/./ckpt.bin) or 'open_clip:<arch>/random'"
)
RANDOM_SEED = 0  # seeds open_clip:<arch>/random so every process builds the same weights
_FALSY = ("0", "false", "no", "off")


def hub_offline() -> bool:
    """True unless the user explicitly allowed downloads with HF_HUB_OFFLINE=0 (Tina's default is offline)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in _FALSY


def _as_text_list(texts) -> list[str]:
    # A bare string would silently encode its characters one by one; refuse it.
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("encode() takes a list of strings, e.g. encoder.encode(['sandal'])")
    return list(texts)


class TextEncoder:
    """Interface: `encode(texts) -> (N, dim)` float32, L2-normalised, on CPU; `encode_images` if `has_image_tower`."""

    name: str  # stable, written into manifests and bundles
    dim: int  # E, the embedding width
    has_image_tower: bool = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._loaded = False
        self.load_seconds: float | None = None  # wall time of the weight load, once done

    def load(self) -> "TextEncoder":
        """Load the weights now (otherwise the first encode does it). Safe to call from several threads."""
        with self._lock:
            if not self._loaded:
                t0 = time.perf_counter()
                self._load()
                self.load_seconds = time.perf_counter() - t0
                self._loaded = True
                log.info("loaded text encoder %s on %s in %.2f s", self.name, self.device, self.load_seconds)
        return self

    def _load(self) -> None:
        raise NotImplementedError

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) float32 CPU tensor with unit-norm rows; N may be 0."""
        texts = _as_text_list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        self.load()
        out = self._encode(texts).float().cpu()
        return F.normalize(out, dim=-1)  # the backends normalise already; this pins the contract

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, images) -> torch.Tensor:
        """(N, dim) image embeddings in the text space; `images` float (N, 3 or 1, H, W) in [0, 1]."""
        raise TinaError(
            f"text encoder '{self.name}' has no image tower; use an open_clip encoder "
            f"(e.g. 'open_clip:ViT-B-32/<tag or checkpoint>') for image embeddings"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"


def is_path(weights: str) -> bool:
    """Whether the weights part of an encoder name is a checkpoint path (tags never contain a slash)."""
    return "/" in weights or "\\" in weights or weights.startswith("~")
