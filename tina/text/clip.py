"""open_clip encoders (the [clip] extra): a text tower for class names and an image tower in the same space."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tina.errors import TinaError
from tina.extras import require
from tina.text.base import ENCODER_FORMS, RANDOM_SEED, TextEncoder, hub_offline, is_path

log = logging.getLogger(__name__)


class OpenClipEncoder(TextEncoder):
    """An open_clip model: text tower for `encode`, image tower for `encode_images`, same embedding space."""

    has_image_tower = True

    def __init__(self, arch: str, weights: str, device: str | torch.device = "cpu"):
        super().__init__(device)
        require("clip", f"text encoder open_clip:{arch}")
        import open_clip

        if open_clip.get_model_config(arch) is None:
            raise TinaError(
                f"unknown open_clip architecture '{arch}'; choose one of open_clip.list_models(), "
                f"e.g. ViT-B-32, ViT-B-16, RN50 (encoder forms: {ENCODER_FORMS})"
            )
        self.arch, self.weights = arch, weights
        self.name = f"open_clip:{arch}/{weights}"
        self.dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self.tag_cfg: dict = {}  # the pretrained tag's settings (quick_gelu, mean/std, ...), {} for paths/random
        # Resolve the weights file now, so a missing checkpoint fails before anyone waits on a model build.
        self.checkpoint = self._resolve_weights(open_clip)

    def _resolve_weights(self, open_clip) -> str | None:
        """Path of the checkpoint to load, None for random weights; raises TinaError when it is not here."""
        if self.weights == "random":
            return None
        if is_path(self.weights):
            path = _find_checkpoint_file(Path(self.weights).expanduser(), self.name)
            self._check_activation(open_clip, path)
            return path
        tags = open_clip.list_pretrained_tags_by_model(self.arch)
        self.tag_cfg = open_clip.get_pretrained_cfg(self.arch, self.weights) or {}
        if not self.tag_cfg:
            raise TinaError(
                f"'{self.weights}' is not a pretrained tag of open_clip {self.arch} "
                f"(tags: {', '.join(tags) or 'none'}). "
                f"A local checkpoint path must contain a slash: open_clip:{self.arch}/./{self.weights}"
            )
        cached = _cached_tag_file(self.tag_cfg)
        if cached:
            return cached
        if hub_offline():
            hub = self.tag_cfg.get("hf_hub", "").rstrip("/")
            where = f"https://huggingface.co/{hub}" if hub else self.tag_cfg.get("url", "the open_clip release page")
            raise TinaError(
                f"weights for {self.name} are not on this machine and Tina runs offline (HF_HUB_OFFLINE=1). "
                f"Copy open_clip_model.safetensors or open_clip_pytorch_model.bin from {where} here and use "
                f"'open_clip:{self.arch}//absolute/path/to/that/file', or run with HF_HUB_OFFLINE=0 to download "
                f"(open_clip:{self.arch}/random gives untrained weights for plumbing tests)"
            )
        try:  # the user allowed downloads
            return open_clip.pretrained.download_pretrained(self.tag_cfg)
        except Exception as e:  # network errors come in many types
            raise TinaError(f"could not download weights for {self.name}: {e}") from e

    def _check_activation(self, open_clip, path: str) -> None:
        """A local checkpoint must run with the activation it was trained with; open_clip would only warn.

        OpenAI's CLIP weights need QuickGELU (archs named <arch>-quickgelu); most others GELU. The
        checkpoint's own open_clip_config.json (beside it in hub downloads) decides when it is there,
        else a path naming OpenAI; a mismatch is an error, never a silently different encoder.
        """
        arch_quick = bool(open_clip.get_model_config(self.arch).get("quick_gelu", False))
        sidecar = Path(path).parent / "open_clip_config.json"
        want, why = None, ""
        if sidecar.is_file():
            try:
                want = bool(json.loads(sidecar.read_text()).get("model_cfg", {}).get("quick_gelu", False))
                why = f"{sidecar} says quick_gelu={want}"
            except (OSError, ValueError, AttributeError):
                log.warning("ignoring unreadable %s", sidecar)
        if want is None and "openai" in str(path).lower():
            want, why = True, f"{path} names OpenAI's weights, which were trained with QuickGELU"
        if want is None or want == arch_quick:
            return
        base = self.arch[: -len("-quickgelu")] if self.arch.endswith("-quickgelu") else self.arch
        fix = f"{base}-quickgelu" if want else base
        raise TinaError(f"{self.name}: {why}, but open_clip {self.arch} uses {'QuickGELU' if arch_quick else 'GELU'}; "
                        f"use open_clip:{fix}/{self.weights}")

    def _load(self) -> None:
        import open_clip

        quick_gelu = bool(self.tag_cfg.get("quick_gelu", False))  # open_clip only warns on a mismatch; we apply it
        try:
            # Random weights under a fixed seed, without disturbing the caller's RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = open_clip.create_model(
                    self.arch,
                    pretrained=self.checkpoint,
                    force_quick_gelu=quick_gelu,
                    pretrained_image=False,
                    pretrained_text=False,  # never fetch separate tower weights from the hub
                    device="cpu",
                )
        except Exception as e:  # torch.load / safetensors / state-dict mismatches all mean "wrong checkpoint"
            raise TinaError(
                f"could not load {self.name}: {e}. The checkpoint must be an open_clip state dict for {self.arch} "
                f"(open_clip_pytorch_model.bin or open_clip_model.safetensors)"
            ) from e
        self._model = model.to(self.device).eval()
        self._tokenizer = _get_tokenizer(open_clip, self.arch, self.name)
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        for key in ("mean", "std", "interpolation", "resize_mode"):  # the tag knows its training preprocessing
            if key in self.tag_cfg:
                cfg[key] = self.tag_cfg[key]
        self.preprocess_cfg = cfg

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 256):
            tokens = self._tokenizer(texts[i : i + 256]).to(self.device)  # (n, context_length)
            out.append(self._model.encode_text(tokens, normalize=True).cpu())
        return torch.cat(out)

    def encode_images(self, images) -> torch.Tensor:
        x = _as_image_batch(images)  # (N, 3, H, W) float in [0, 1]
        if len(x) == 0:
            return torch.zeros(0, self.dim)
        self.load()  # outside inference_mode: weights must stay ordinary tensors
        return self._encode_images(x)

    @torch.inference_mode()
    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), 64):
            batch = preprocess_images(x[i : i + 64].to(self.device), self.preprocess_cfg)  # (n, 3, S, S)
            out.append(self._model.encode_image(batch, normalize=True).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


def _find_checkpoint_file(path: Path, name: str) -> str:
    """A checkpoint file, or the file inside a folder laid out like the open_clip hub repos."""
    if path.is_dir():
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
            if (path / fname).is_file():
                return str(path / fname)
        raise TinaError(f"{name}: folder {path} holds no open_clip_model.safetensors or open_clip_pytorch_model.bin")
    if not path.is_file():
        raise TinaError(f"{name}: checkpoint {path} does not exist; give the path of an open_clip checkpoint file")
    return str(path)


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """The tag's weights if an earlier download left them in a local cache; never touches the network."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            stem = "open_clip_model" if filename == "open_clip_pytorch_model.bin" else filename[:-4]
            candidates.insert(0, stem + ".safetensors")  # open_clip prefers safetensors too
        for fname in candidates:
            try:
                return hf_hub_download(repo_id, fname, local_files_only=True)
            except Exception:  # not cached (LocalEntryNotFoundError and friends)
                continue
    url = tag_cfg.get("url", "")
    if url:
        # open_clip keeps URL downloads here (open_clip.pretrained.download_pretrained_from_url).
        target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if target.is_file():
            return str(target)
    return None


def _get_tokenizer(open_clip, arch: str, name: str):
    # CLIP archs use open_clip's SimpleTokenizer, whose BPE vocabulary ships inside the package; only
    # archs with a Hugging Face tokenizer (SigLIP, XLM-R, ...) need a hub download, which offline fails fast.
    hf_tokenizer = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    offline = {"local_files_only": True} if hf_tokenizer and hub_offline() else {}  # CLIP's own tokenizer takes no such key
    try:
        return open_clip.get_tokenizer(arch, **offline)
    except Exception as e:
        raise TinaError(
            f"{name}: could not build the tokenizer of {arch} ({e}); this architecture needs a Hugging Face "
            f"tokenizer that is not cached here; use a CLIP architecture such as ViT-B-32"
        ) from e


def _as_image_batch(images) -> torch.Tensor:
    """(N, C, H, W) tensor or array, C in {1, 3}, float in [0, 1] or uint8 → float32 (N, 3, H, W)."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"encode_images expects (N, 3, H, W) or (N, 1, H, W) images, got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey (Fashion-MNIST) → RGB


def preprocess_images(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """open_clip's eval preprocessing with torch ops on a batch: resize (+ crop or pad) and normalise.

    x: (N, 3, H, W) float in [0, 1]. cfg: open_clip preprocess_cfg (size, mean, std, interpolation, resize_mode).
    """
    size = cfg.get("size", 224)
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}.get(cfg.get("interpolation"), "bicubic")
    resize_mode = cfg.get("resize_mode", "shortest")
    h, w = x.shape[-2:]

    def resize(x, size):
        kw = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
        return F.interpolate(x, size=size, mode=mode, **kw).clamp(0, 1)  # bicubic overshoots [0, 1]

    if resize_mode == "squash":
        x = resize(x, (th, tw))
    elif resize_mode == "longest":
        s = min(th / h, tw / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        x = resize(x, (nh, nw))
        fill = float(cfg.get("fill_color", 0)) / 255.0
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=fill)
    else:  # "shortest": scale the short side to the target, then centre-crop (torchvision Resize + CenterCrop)
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        x = resize(x, (nh, nw))
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw]
    mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
