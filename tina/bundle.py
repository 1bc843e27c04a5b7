"""A trained generator as a self-describing folder; saved atomically, loaded with strict checks.

    bundle/
      bundle.json            format, target, dataset + image spec, text encoder, layout fingerprint,
                             generator config, k_max, metrics, training summary
      config.yaml            the resolved training config
      layout.json            ParamLayout.to_dict()
      scheduler_config.json  the diffusers DDPM config every sampler is built from
      weights.safetensors    EMA generator weights ("dit.*"), layout statistics ("layout.*"),
                             frozen base weights ("base.*", timm targets), vocabulary text
                             embeddings ("vocab.names"), image projector ("projector.*", optional),
                             classifier-selection anchor ("anchor.*", when the DiT generates residuals)
      vocab.json             class names of the vocabulary, in the order of vocab.names
      quality.json           optional: the calibration behind expected accuracies (tina/expected.py,
                             written by python -m evaluation.calibrate), checked against vocab and layout

Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tina.anchor import SelectionAnchor
from tina.atomic import FolderKind, atomic_folder
from tina.expected import QUALITY_FILE, load_quality
from tina.errors import TinaError
from tina.layout import ParamLayout
from tina.model import DiT, DiTConfig
from tina.targets import ImageSpec
from tina.validate import check_image_spec, check_state, json_field

log = logging.getLogger(__name__)
BUNDLE_FORMAT = "tina-generator/1"
FILES = ("bundle.json", "layout.json", "scheduler_config.json", "weights.safetensors", "vocab.json")
FOLDER = FolderKind("bundle.json", BUNDLE_FORMAT, frozenset(FILES) | {"config.yaml", QUALITY_FILE, "quality_rows.json"}, "generator folder")


@dataclass
class Bundle:
    """Everything sampling needs, in memory."""

    dit: DiT
    layout: ParamLayout
    scheduler_config: dict
    target: str
    image: ImageSpec
    dataset: str
    text_encoder: str
    k_max: int
    vocab: list[str]
    vocab_emb: torch.Tensor  # (V, E) plain-name embeddings, L2-normalised
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # frozen (non-generated) weights
    projector: dict[str, torch.Tensor] = field(default_factory=dict)  # image → text-embedding projector
    projector_config: dict = field(default_factory=dict)
    anchor: SelectionAnchor | None = None  # generated vectors are residuals from this (tina/anchor.py)
    meta: dict = field(default_factory=dict)  # the rest of bundle.json (metrics, sampling defaults...)
    quality: dict | None = None  # quality.json: expected-accuracy calibration (tina/expected.py)
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint


def save_bundle(bundle: Bundle, path: str | os.PathLike, config_yaml: str | None = None,
                weights_dtype: torch.dtype = torch.float32) -> Path:
    """Write the folder under a temporary name, then rename it into place.

    `weights_dtype=torch.float16` halves the generator's size on disk (the shipped default uses it);
    loading always computes in float32.
    """
    with atomic_folder(path, FOLDER) as tmp:
        tensors = {f"dit.{k}": v.detach().to(weights_dtype).contiguous() for k, v in bundle.dit.state_dict().items()}
        tensors |= {f"layout.{k}": v.contiguous() for k, v in bundle.layout.stats().items()}
        tensors |= {f"base.{k}": v.detach().contiguous() for k, v in bundle.base.items()}
        tensors |= {f"projector.{k}": v.detach().contiguous() for k, v in bundle.projector.items()}
        if bundle.anchor is not None:
            tensors |= {f"anchor.{k}": v for k, v in bundle.anchor.tensors().items()}
        tensors["vocab.names"] = bundle.vocab_emb.float().contiguous()
        save_file(tensors, tmp / "weights.safetensors")
        meta = {
            "format": BUNDLE_FORMAT,
            "target": bundle.target,
            "dataset": bundle.dataset,
            "image": bundle.image.to_dict(),
            "text_encoder": bundle.text_encoder,
            "layout_fingerprint": bundle.layout.fingerprint,
            "dit": asdict(bundle.dit.cfg),
            "k_max": bundle.k_max,
            "projector": bundle.projector_config,
            "anchor": None if bundle.anchor is None else {"kind": "selection", "temperature": bundle.anchor.temperature},
        } | {k: v for k, v in bundle.meta.items() if k not in ("format", "anchor")}
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2))
        (tmp / "layout.json").write_text(json.dumps(bundle.layout.to_dict(), indent=2))
        (tmp / "scheduler_config.json").write_text(json.dumps(bundle.scheduler_config, indent=2, default=str))
        (tmp / "vocab.json").write_text(json.dumps(bundle.vocab, indent=1))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if bundle.quality is not None:
            (tmp / QUALITY_FILE).write_text(json.dumps(bundle.quality, indent=1))
    return Path(path)


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TinaError(f"checkpoint file {path} is unreadable or corrupt: {e}") from None


def _parse(make, d, where):
    """make(d), with a malformed structure reported as one line naming its file and the key at fault."""
    try:
        return make(d)
    except KeyError as e:
        raise TinaError(f"{where}: key {e} is missing") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise TinaError(f"{where}: malformed ({e})") from None


def read_meta(path: Path) -> tuple[dict, "ImageSpec", list[str]]:
    """A generator folder's checked metadata: bundle.json (format and required keys), its image spec and
    vocab.json. The one check of them, for loading and for routing (which reads no weights but the vocabulary)."""
    if not path.is_dir():
        raise TinaError(f"checkpoint {str(path)!r} does not exist (pass a generator folder, or 'default')")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise TinaError(f"{path} is not a Tina generator: missing {', '.join(missing)}")
    mpath = path / "bundle.json"
    meta = _read_json(mpath)
    if json_field(meta, "format", str, mpath, required=False) != BUNDLE_FORMAT:
        raise TinaError(f"{path} has format {meta.get('format')!r}; this Tina reads {BUNDLE_FORMAT!r}")
    for key, kind in (("target", str), ("dataset", str), ("text_encoder", str), ("layout_fingerprint", str), ("dit", dict),
                      ("k_max", int), ("image", dict)):
        json_field(meta, key, kind, mpath)
    if meta["k_max"] < 2:
        raise TinaError(f"{mpath}: key 'k_max' must be >= 2, got {meta['k_max']}")
    image = check_image_spec(meta["image"], mpath)
    vocab = _read_json(path / "vocab.json")
    if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
        raise TinaError(f"{path / 'vocab.json'}: expected a list of class names")
    return meta, image, vocab


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu", text_encoder: str | None = None) -> Bundle:
    """Load and check a generator folder: format, layout fingerprint, tensor shapes (strict)."""
    path = Path(path)
    meta, image, vocab = read_meta(path)
    mpath = path / "bundle.json"
    layout = _parse(ParamLayout.from_dict, _read_json(path / "layout.json"), path / "layout.json")
    if layout.fingerprint != meta["layout_fingerprint"]:
        raise TinaError(
            f"{path}: layout fingerprint {layout.fingerprint} does not match the bundle's {meta['layout_fingerprint']} "
            "(the checkpoint was made for another parameter layout)"
        )
    if text_encoder is not None and text_encoder != meta["text_encoder"]:
        raise TinaError(f"{path} was trained with text encoder {meta['text_encoder']!r}, not {text_encoder!r}")
    scheduler = _read_json(path / "scheduler_config.json")
    if not isinstance(scheduler, dict):
        raise TinaError(f"{path / 'scheduler_config.json'}: expected a JSON object, got {type(scheduler).__name__}")
    try:
        tensors = load_file(path / "weights.safetensors", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise TinaError(f"{path}/weights.safetensors is corrupt: {e}") from None

    def group(prefix):
        return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    try:
        layout.load_stats(group("layout"))
    except (KeyError, RuntimeError, ValueError) as e:
        raise TinaError(f"{path}/weights.safetensors: bad layout statistics ({e})") from None
    dit = DiT(_parse(lambda d: DiTConfig(**d), meta["dit"], f"{mpath} key 'dit'"))
    check_state(dit, {k: v.float() for k, v in group("dit").items()}, f"{path}/weights.safetensors")
    dit.to(device).eval()
    if "vocab.names" not in tensors:
        raise TinaError(f"{path}/weights.safetensors: tensor 'vocab.names' is missing")
    vocab_emb = tensors["vocab.names"]
    if len(vocab) != vocab_emb.shape[0]:
        raise TinaError(f"{path}: vocab.json has {len(vocab)} names but {vocab_emb.shape[0]} embeddings")
    anchor = None
    if json_field(meta, "anchor", (dict, type(None)), mpath, required=False):
        if meta["anchor"].get("kind") != "selection":
            raise TinaError(f"{path}: unknown anchor kind {meta['anchor'].get('kind')!r} (this Tina knows 'selection')")
        anchor = SelectionAnchor.from_tensors(layout, group("anchor"), meta["anchor"].get("temperature", 0.02))
        if anchor.num_classes != len(vocab):
            raise TinaError(f"{path}: the anchor has {anchor.num_classes} class rows but the vocabulary {len(vocab)} names")
    known = {"format", "target", "dataset", "image", "text_encoder", "layout_fingerprint", "dit", "k_max", "projector", "anchor"}
    return Bundle(
        dit=dit,
        layout=layout,
        scheduler_config=scheduler,
        target=meta["target"],
        image=image,
        dataset=meta["dataset"],
        text_encoder=meta["text_encoder"],
        k_max=int(meta["k_max"]),
        vocab=vocab,
        vocab_emb=vocab_emb,
        base=group("base"),
        projector=group("projector"),
        projector_config=json_field(meta, "projector", (dict, type(None)), mpath, required=False) or {},
        anchor=anchor,
        meta={k: v for k, v in meta.items() if k not in known},
        quality=load_quality(path, vocab, layout.fingerprint),
        path=path,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m tina.bundle SRC DEST [--half] [--projector-from BUNDLE]`: copy a generator folder,
    optionally with float16 weights and with the image projector of another bundle (the projector
    depends only on the dataset and text encoder, so a retrained generator can keep it)."""
    import argparse
    import hashlib
    import sys

    ap = argparse.ArgumentParser(prog="python -m tina.bundle", description=main.__doc__)
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--half", action="store_true", help="store the generator weights as float16")
    ap.add_argument("--projector-from", metavar="BUNDLE", help="take the image projector from this generator folder")
    args = ap.parse_args(argv)
    try:
        b = load_bundle(args.src)
        if args.projector_from:
            other = load_bundle(args.projector_from)
            if not other.projector:
                raise TinaError(f"{args.projector_from} has no image projector")
            if (other.text_encoder, other.dataset, other.vocab) != (b.text_encoder, b.dataset, b.vocab):
                raise TinaError(f"{args.projector_from} was made for another text encoder, dataset or vocabulary than {args.src}")
            b.projector, b.projector_config = other.projector, other.projector_config
        cfg = Path(args.src) / "config.yaml"
        out = save_bundle(b, args.dest, config_yaml=cfg.read_text() if cfg.is_file() else None,
                          weights_dtype=torch.float16 if args.half else torch.float32)
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir())
    digest = hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
    print(f"{out}: {size / 1e6:.1f} MB, weights.safetensors sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
