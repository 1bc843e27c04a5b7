"""Read named weights back out of a model.pt2 (torch.export archive) without unpickling anything.

A generated head-on-backbone folder keeps its frozen backbone in one place only: inside model.pt2,
which torch.export.load needs anyway. torch.export writes each weight as raw bytes next to a JSON
table (archive/data/weights/model_weights_config.json: name -> file, sizes, strides, "use_pickle");
this reads the tensors a TargetNet expects from that table, checking sizes and layout, and refuses
anything stored pickled.
"""

from __future__ import annotations

import io
import json
import math
import zipfile

import torch

from tina.errors import TinaError

CONFIG = "data/weights/model_weights_config.json"


def read_pt2_weights(data: bytes, wanted: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """Tensors named like `wanted` (name -> a tensor of the expected shape and dtype) from model.pt2 bytes."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        cfg_name = next(n for n in z.namelist() if n.endswith(CONFIG))
        table = json.loads(z.read(cfg_name))["config"]
    except (zipfile.BadZipFile, StopIteration, KeyError, ValueError) as e:
        raise TinaError(f"{where}: not a torch.export archive with a weights table ({e})") from None
    root = cfg_name[: -len("model_weights_config.json")]
    out = {}
    for name, ref in wanted.items():
        meta = table.get(name)
        if meta is None:
            raise TinaError(f"{where}: weight {name!r} is missing")
        tm = meta["tensor_meta"]
        sizes = [s["as_int"] for s in tm["sizes"]]
        strides = [s["as_int"] for s in tm["strides"]]
        contiguous = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
        if meta.get("use_pickle") or sizes != list(ref.shape) or (ref.numel() > 1 and strides != contiguous) \
                or tm["storage_offset"]["as_int"] != 0:
            raise TinaError(f"{where}: weight {name!r} is stored as {sizes} (strides {strides}), expected {list(ref.shape)} "
                            "as plain contiguous data")
        raw = z.read(root + meta["path_name"])
        nbytes = ref.numel() * ref.element_size()
        if len(raw) < nbytes:
            raise TinaError(f"{where}: weight {name!r} holds {len(raw)} bytes, expected {nbytes}")
        out[name] = torch.frombuffer(bytearray(raw[:nbytes]), dtype=ref.dtype).reshape(ref.shape).clone() if nbytes else ref.new_zeros(ref.shape)
    return out
