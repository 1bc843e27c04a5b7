"""A generated model as a folder that runs anywhere.

    model.safetensors   the full state dict (generated + frozen weights)
    config.json         classes in order, target, image spec (normalisation), prompt, generator
                        fingerprint, seed and sampler settings
    model.pt2           torch.export program with preprocessing inside and a dynamic batch:
                        torch.export.load("model.pt2").module()(images) -> logits (N, k),
                        images float in [0, 1], (N, C, H, W) — no Tina needed
    model.onnx          optional (`formats=("pt2", "onnx")`)

`load_generated(folder)` rebuilds the nn.Module (with `.classes`) from safetensors + JSON only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tina.atomic import atomic_folder
from tina.errors import TinaError
from tina.targets import ImageSpec, TargetNet, get_target

log = logging.getLogger(__name__)
MODEL_FORMAT = "tina-model/1"


def export_program(net: TargetNet) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension."""
    im = net.image
    example = torch.rand(2, im.channels, im.size, im.size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    return torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))


def save_generated(net: TargetNet, folder: str | os.PathLike, formats: tuple[str, ...] = ("pt2",)) -> Path:
    """Write the model folder atomically (temporary folder, then rename)."""
    folder = Path(folder)
    if folder.exists() and not (folder / "config.json").is_file():
        raise TinaError(f"{folder} exists and is not a Tina model folder; choose another --output")
    with atomic_folder(folder) as tmp:
        info = dict(getattr(net, "tina_info", {}))
        config = {
            "format": MODEL_FORMAT,
            "classes": list(net.classes),
            "num_classes": len(net.classes),
            "target": info.pop("target", None) or _target_name(net),
            "image": net.image.to_dict(),
            "num_parameters": sum(p.numel() for p in net.parameters()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **{k: v for k, v in info.items() if k != "seconds"},
            "usage": "torch.export.load('model.pt2').module()(images) with images float in [0, 1], shape (N, "
                     f"{net.image.channels}, {net.image.size}, {net.image.size}) -> logits (N, {len(net.classes)}); "
                     "tina.images.load_image(path, ImageSpec.from_dict(config['image'])) reads a file the way training did",
        }
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if "pt2" in formats:
            torch.export.save(export_program(net), tmp / "model.pt2")
        if "onnx" in formats:
            _save_onnx(net, tmp / "model.onnx")
    return folder


def _save_onnx(net: TargetNet, path: Path) -> None:
    try:
        example = torch.rand(2, net.image.channels, net.image.size, net.image.size)
        torch.onnx.export(net.eval(), (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as e:  # noqa: BLE001 - missing onnx package or exporter errors
        raise TinaError(f"ONNX export failed ({e}); install the onnx extra: pip install 'tina[onnx]'") from None


def _target_name(net: TargetNet) -> str:
    return "cnn-5k" if type(net.body).__name__ == "CNN5kBody" else "unknown"


def load_generated(folder: str | os.PathLike) -> TargetNet:
    """nn.Module with `.classes` from a generated model folder (safetensors + JSON, strict)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise TinaError(f"{folder} is not a generated model folder (needs config.json and model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        state = load_file(w_path)
    except Exception as e:  # noqa: BLE001
        raise TinaError(f"{folder}: corrupt model files ({e})") from None
    if cfg.get("format") != MODEL_FORMAT:
        raise TinaError(f"{folder}: format {cfg.get('format')!r}, expected {MODEL_FORMAT!r}")
    net = get_target(cfg["target"]).build(int(cfg["num_classes"]), ImageSpec.from_dict(cfg["image"]))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TinaError(f"{folder}: weights do not match config.json: {str(e).splitlines()[0]}") from None
    net.classes = list(cfg["classes"])
    net.tina_info = cfg
    return net.eval()
