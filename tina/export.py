"""A generated model as a folder that runs anywhere.

    model.safetensors   the generated weights; for a whole-network target (cnn-5k) the full state dict
    config.json         classes in order, target, image spec (normalisation), prompt, generator
                        fingerprint, seed and sampler settings, where the frozen weights are, sha256
                        of every other file
    model.pt2           torch.export program with preprocessing inside and a dynamic batch:
                        torch.export.load("model.pt2").module()(images) -> logits (N, k),
                        images float in [0, 1], (N, C, H, W) — no Tina needed. torch.export runs
                        once per architecture (target, k, image spec, torch version); later models
                        reuse that program with their own weights (`program_bytes`)
    model.onnx          optional (`formats=("pt2", "onnx")`)

A head-on-backbone target (resnet18+linear, resnet20+linear) stores its frozen backbone once: inside
model.pt2 (config "frozen": {"in": "model.pt2"}), which torch.export needs anyway; model.safetensors
then holds the generated head only, and `load_generated` reads the backbone back out of model.pt2
without unpickling (tina/pt2_weights.py). Without pt2 the backbone goes into model.safetensors. With
`backbone=FILE` many folders share one backbone file: each folder holds its head (a few KB) and
config.json names FILE with its sha256; such a folder has no model.pt2 (a program must contain its weights).

`load_generated(folder)` rebuilds the nn.Module (with `.classes`) from safetensors + JSON only, after
checking every file it reads against its recorded sha256. `save_generated` replaces only a folder it
wrote itself (tina.atomic), and each file is made in memory first, so a full disk is an OSError
(one line from the CLI), not a C++ abort half-way through a zip writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load, save

from tina.atomic import FolderKind, atomic_folder, atomic_write_bytes
from tina.errors import TinaError
from tina.pt2_weights import read_pt2_weights
from tina.targets import TargetNet, get_target
from tina.validate import check_image_spec, check_state, json_field

log = logging.getLogger(__name__)
MODEL_FORMAT = "tina-model/1"
FOLDER = FolderKind("config.json", MODEL_FORMAT, frozenset({"config.json", "model.safetensors", "model.pt2", "model.onnx"}),
                    "model folder")


def export_program(net: TargetNet) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension (the target decides how: Target.export)."""
    return get_target(net.target).export(net)


TEMPLATE_FORMAT = "tina-pt2-template/1"  # bump when the weight swap below changes
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"  # inside a .pt2 archive (under its root folder)


def program_bytes(net: TargetNet) -> bytes:
    """model.pt2 for `net`: torch.export once per architecture, then that program with this net's weights.

    torch.export of even a 4k-parameter CNN costs ~1.5 s (torch._dynamo's import and the trace), yet the
    program depends only on the architecture: (torch version, target, k, image spec, parameter shapes).
    A .pt2 archive stores each parameter as raw bytes under a name listed in its weights config, so the
    first export of an architecture is kept in `$TINA_CACHE/export` (sha256-checked before every use)
    and later models copy it with their parameters' bytes swapped in. Anything unexpected in the
    template (a pickled weight, a shape or dtype that differs) falls back to a fresh export."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    key = hashlib.sha256(json.dumps({
        "format": TEMPLATE_FORMAT, "torch": torch.__version__, "target": net.target, "k": len(net.classes),
        "image": net.image.to_dict(), "params": {k: [str(v.dtype), list(v.shape)] for k, v in state.items()},
    }, sort_keys=True).encode()).hexdigest()[:32]
    folder = _cache_dir()
    template = _read_template(folder / f"{key}.pt2", folder / f"{key}.sha256")
    if template is not None:
        try:
            return _swap_weights(template, state)
        except (KeyError, ValueError, zipfile.BadZipFile) as e:
            log.warning("export template %s does not fit (%s); exporting afresh", key, e)
    buf = io.BytesIO()
    torch.export.save(export_program(net), buf)
    data = buf.getvalue()
    try:  # a cache is an optimisation: a read-only or full disk only costs the next export
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{key}.pt2", data)
        atomic_write_bytes(folder / f"{key}.sha256", hashlib.sha256(data).hexdigest().encode())
    except (OSError, TinaError) as e:
        log.info("export template not cached (%s)", e)
    return data


def _cache_dir() -> Path:
    base = os.environ.get("TINA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tina")
    return Path(base) / "export"


def _read_template(path: Path, digest_path: Path) -> bytes | None:
    """The cached archive when it is there and matches its recorded sha256, else None."""
    try:
        data, digest = path.read_bytes(), digest_path.read_text().strip()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        log.warning("export template %s fails its sha256 check; exporting afresh", path)
        return None
    return data


def _swap_weights(template: bytes, state: dict[str, torch.Tensor]) -> bytes:
    """A copy of the .pt2 archive `template` whose stored parameters are `state`'s (same names, shapes, dtypes)."""
    src = zipfile.ZipFile(io.BytesIO(template))
    config_name = next(n for n in src.namelist() if n.endswith(WEIGHTS_CONFIG))
    root = config_name[: -len(WEIGHTS_CONFIG)]
    config = json.loads(src.read(config_name))["config"]
    if set(config) != set(state):
        raise ValueError(f"template parameters {sorted(config)} differ from the model's")
    new = {}
    for name, entry in config.items():
        data = state[name].numpy().tobytes()
        path = f"{root}data/weights/{entry['path_name']}"
        if entry.get("use_pickle") or src.getinfo(path).file_size != len(data):
            raise ValueError(f"parameter {name} is not stored as {len(data)} raw bytes")
        new[path] = data
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, new.get(info.filename) or src.read(info.filename))
    return out.getvalue()


def save_generated(net: TargetNet, folder: str | os.PathLike, formats: tuple[str, ...] = ("pt2",),
                   backbone: str | os.PathLike | None = None) -> Path:
    """Write the model folder atomically (temporary folder, then an atomic swap); TinaError, before
    anything is written, when `folder` is a file or a folder Tina did not write (tina.atomic).
    `backbone`: a shared file for the frozen weights of a head-on-backbone target (see the module docstring)."""
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    frozen_names = get_target(net.target).frozen_names(net)
    frozen_info = None
    if backbone is not None:
        if not frozen_names:
            raise TinaError(f"--backbone is for head-on-backbone targets; a {net.target} has no frozen weights")
        formats = tuple(f for f in formats if f == "onnx")  # a program must hold its weights: no pt2
        frozen_info = {"file": str(Path(backbone).resolve()), "sha256": write_backbone({n: state[n] for n in frozen_names}, backbone)}
    elif frozen_names and "pt2" in formats:
        frozen_info = {"in": "model.pt2"}
    if frozen_info is not None:
        state = {k: v for k, v in state.items() if k not in frozen_names}
    files = {"model.safetensors": save(state)}
    if "pt2" in formats:
        files["model.pt2"] = program_bytes(net)
    if "onnx" in formats:
        files["model.onnx"] = _onnx_bytes(net)
    info = dict(getattr(net, "tina_info", {}))
    info.pop("target", None)
    config = {
        "format": MODEL_FORMAT,
        "classes": list(net.classes),
        "num_classes": len(net.classes),
        "target": net.target,
        "image": net.image.to_dict(),
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: v for k, v in info.items() if k not in ("seconds", "sha256", "frozen")},
        **({"frozen": frozen_info} if frozen_info else {}),
        "usage": "torch.export.load('model.pt2').module()(images) with images float in [0, 1], shape (N, "
                 f"{net.image.channels}, {net.image.size}, {net.image.size}) -> logits (N, {len(net.classes)}); "
                 "tina.images.load_image(path, ImageSpec.from_dict(config['image'])) reads a file the way training did",
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    files["config.json"] = json.dumps(config, indent=2).encode()
    with atomic_folder(folder, FOLDER) as tmp:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    return folder


def write_backbone(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """Write a shared backbone file once (temporary name, then rename); returns its sha256. An existing
    file is reused only when it holds exactly these tensors, and is never overwritten."""
    path = Path(path)
    data = save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    if path.exists():
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise TinaError(f"{path} exists and is not this model's backbone; choose another --backbone file")
        return digest
    atomic_write_bytes(path, data)
    return digest


def _onnx_bytes(net: TargetNet) -> bytes:
    try:
        buf = io.BytesIO()
        example = torch.rand(2, net.image.channels, net.image.size, net.image.size)
        torch.onnx.export(net.eval(), (example,), buf, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        return buf.getvalue()
    except Exception as e:  # noqa: BLE001 - missing onnx package or exporter errors
        raise TinaError(f"ONNX export failed ({e}); install the onnx extra: pip install 'tina[onnx]'") from None


def load_generated(folder: str | os.PathLike) -> TargetNet:
    """nn.Module with `.classes` from a generated model folder (safetensors + JSON, checksummed, strict)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not folder.is_dir():
        raise TinaError(f"{str(folder)!r} is not a folder (pass a folder written by tina generate)")
    if not cfg_path.is_file() or not w_path.is_file():
        raise TinaError(f"{folder} is not a generated model folder (needs config.json and model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        data = w_path.read_bytes()
    except (OSError, ValueError) as e:
        raise TinaError(f"{cfg_path}: unreadable or not JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != MODEL_FORMAT:
        raise TinaError(f"{cfg_path}: format {cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {MODEL_FORMAT!r}")
    sums = json_field(cfg, "sha256", dict, cfg_path, required=False)
    if sums is None:
        log.warning("%s records no checksums (written before they existed); weights not verified", cfg_path)
    elif hashlib.sha256(data).hexdigest() != sums.get("model.safetensors"):
        raise TinaError(f"{w_path} does not match the sha256 in config.json (corrupt or edited); generate the model again")
    classes = json_field(cfg, "classes", list, cfg_path)
    k = json_field(cfg, "num_classes", int, cfg_path)
    if len(classes) != k or not all(isinstance(c, str) for c in classes):
        raise TinaError(f"{cfg_path}: 'classes' must be {k} names (num_classes)")
    image = check_image_spec(json_field(cfg, "image", dict, cfg_path), cfg_path)
    try:
        net = get_target(json_field(cfg, "target", str, cfg_path)).build(k, image)
    except ValueError as e:
        raise TinaError(f"{cfg_path}: {e}") from None
    try:
        state = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise TinaError(f"{w_path} is corrupt ({e})") from None
    frozen = json_field(cfg, "frozen", dict, cfg_path, required=False)
    if frozen:
        state |= _frozen_weights(folder, frozen, sums or {}, {n: v for n, v in net.state_dict().items() if n not in state}, cfg_path)
    check_state(net, state, w_path)
    net.classes = list(classes)
    net.tina_info = cfg
    return net.eval()


def _frozen_weights(folder: Path, frozen: dict, sums: dict, wanted: dict[str, torch.Tensor], cfg_path) -> dict[str, torch.Tensor]:
    """The frozen backbone of a head-only folder: from its model.pt2, or from the shared file it names."""
    if frozen.get("in") == "model.pt2":
        path, expected = folder / "model.pt2", sums.get("model.pt2")
    elif "file" in frozen:
        path, expected = Path(frozen["file"]), frozen.get("sha256")
    else:
        raise TinaError(f"{cfg_path}: 'frozen' must name model.pt2 or a backbone file, got {frozen}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TinaError(f"{cfg_path}: the frozen backbone {path} is unreadable ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise TinaError(f"{path} does not match the sha256 in {cfg_path} (another backbone, corrupt or edited)")
    if path.suffix == ".pt2":
        return read_pt2_weights(data, wanted, path)
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for bad files
        raise TinaError(f"{path} is corrupt ({e})") from None
