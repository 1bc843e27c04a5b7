"""The zoo on disk (format in docs/DESIGN.md, "Zoo on disk"): shards, vocabulary, plan and manifest.

  ZOO/plan.json            what this build will produce (tasks, shard names, config identity);
                           written first, checked when a killed build resumes
  ZOO/vocab.safetensors    text embeddings of every class variant, encoded once
  ZOO/<split>-NNNNNN.tar   webdataset shards, one sample per model, written as NAME.tmp then renamed
  ZOO/manifest.json        written last (atomically), once every shard exists; holds each shard's sha256

Shard members have fixed metadata (mtime 0, uid 0), so a shard rebuilt from the same seed is
byte-identical to the one a killed build would have written.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from tina.atomic import atomic_write, atomic_write_bytes, atomic_write_text, stale_files
from tina.training.shardio import check_params, file_sha256
from zoo_builder.tasks import SPLITS, Task, TaskPlan

ZOO_FORMAT = "tina-zoo/1"
PLAN, MANIFEST, VOCAB = "plan.json", "manifest.json", "vocab.safetensors"


@dataclass(frozen=True)
class Shard:
    """A chunk of one split's tasks, written as one tar file."""

    index: int  # global shard number across splits; rank = index % world_size builds it
    split: str
    number: int  # within the split
    tasks: tuple[Task, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"


def plan_shards(plan: TaskPlan, shard_size: int) -> list[Shard]:
    shards = []
    for split in SPLITS:
        tasks = plan.split(split)
        for number, lo in enumerate(range(0, len(tasks), shard_size)):
            shards.append(Shard(len(shards), split, number, tuple(tasks[lo : lo + shard_size])))
    return shards


# ---- atomic small files --------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# ---- vocabulary ----------------------------------------------------------------------------------


def write_vocab(zoo: Path, classes: list[str], encoder, class_variants) -> dict[str, torch.Tensor]:
    """Encode every variant of every class once: names (num_classes, E), variants (num_classes, V, E)."""
    variants = [class_variants(c) for c in classes]
    V = len(variants[0])
    emb = encoder.encode([v for vs in variants for v in vs]).float()  # (num_classes * V, E)
    vocab = {"variants": emb.view(len(classes), V, -1).contiguous()}
    vocab["names"] = vocab["variants"][:, 0].contiguous()  # variant 0 is the plain name
    atomic_write_bytes(zoo / VOCAB, save(vocab, metadata={"text_encoder": encoder.name, "classes": json.dumps(classes)}))
    return vocab


def load_vocab(zoo: Path) -> dict[str, torch.Tensor]:
    return load_file(str(zoo / VOCAB))


# ---- shards --------------------------------------------------------------------------------------


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def encode_sample(task: Task, flat: torch.Tensor, class_names: list[str], emb: torch.Tensor, prompts: list[list[str]], metrics: dict) -> dict[str, bytes]:
    """One model as webdataset members (extension -> bytes); TinaError for non-finite or absurd weights."""
    check_params(flat.detach().float().numpy(), f"task {task.task_id}")
    return {
        "params.npy": _npy(flat.detach().float().numpy()),
        "classes.json": json.dumps({"names": class_names, "ids": list(task.classes)}).encode(),
        "emb.npy": _npy(emb.to(torch.float16).numpy()),
        "prompts.json": json.dumps(prompts).encode(),
        "metrics.json": json.dumps(metrics).encode(),
    }


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, members) samples atomically (tina.atomic): a shard either exists whole or not at all."""
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def read_shard_metrics(path: Path) -> list[dict]:
    """metrics.json of every sample of a shard, without decoding the rest."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith(".metrics.json"):
                out.append(json.loads(tar.extractfile(m).read()))
    return out


def remove_stale_tmp(zoo: Path, names: list[str]) -> None:
    """Leftovers of a killed writer (tina.atomic temporaries, or `name.tmp` from the generic model's
    writer); what they belonged to is rebuilt. Only a rank's own files: another rank may be writing its
    shards right now (atomic_write's temporaries carry their writer's pid, and live ones are kept)."""
    for name in names:
        (zoo / (name + ".tmp")).unlink(missing_ok=True)
        for tmp in stale_files(zoo, name):
            tmp.unlink(missing_ok=True)


# ---- manifest ------------------------------------------------------------------------------------


def build_manifest(zoo: Path, plan_json: dict, shards: list[Shard], generic_metrics: dict) -> dict:
    """Summarise the finished shards into the manifest (format in docs/DESIGN.md)."""
    per_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for sh in shards:
        per_split[sh.split].extend(read_shard_metrics(zoo / sh.name))
    summary = {}
    for split, ms in per_split.items():
        if ms:
            summary[split] = {
                "models": len(ms),
                "oracle_acc": round(float(np.mean([m["oracle_acc"] for m in ms])), 5),
                "selection_acc": round(float(np.mean([m["selection_acc"] for m in ms])), 5),
            }
    man = {"format": ZOO_FORMAT}
    man.update({k: plan_json[k] for k in ("dataset", "target", "token_size", "layout", "layout_fingerprint",
                                          "text_encoder", "num_variants", "config", "config_hash")})  # fmt: skip
    man["splits"] = plan_json["splits"]
    man["held_out_classes"] = plan_json["held_out_classes"]
    man["tasks"] = plan_json["tasks"]
    man["shards"] = {s: [sh.name for sh in shards if sh.split == s] for s in SPLITS}
    man["counts"] = {s: len(per_split[s]) for s in SPLITS} | {"models": sum(len(v) for v in per_split.values())}
    man["shard_sha256"] = {sh.name: file_sha256(zoo / sh.name) for sh in shards}  # checked by every reader
    man["metrics"] = summary
    man["generic"] = {"test_acc": generic_metrics["test_acc"]}
    return man
