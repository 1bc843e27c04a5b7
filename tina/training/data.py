"""Zoo shards → training batches.

A zoo (written by zoo_builder, format in docs/DESIGN.md) is a manifest plus webdataset shards, one
sample per personalized model. Training streams the shards split across ranks and workers and
turns each model into an example with two augmentations that make the generator robust:
  * a random class order (head rows and text embeddings permuted alike), and
  * mixed prompts: each class's text is drawn from its variants (name, templates, descriptions).
Batches pad tasks of different k to the batch's largest k; masks mark the real classes.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from tina.anchor import SelectionAnchor
from tina.errors import TinaError
from tina.layout import ParamLayout
from tina.training.shardio import ShardFile, ShardReader, read_shards

log = logging.getLogger(__name__)
ZOO_FORMAT = "tina-zoo/1"


def read_manifest(zoo: str | Path) -> dict:
    """The zoo's manifest, checked for format; TinaError if the folder is not a finished zoo."""
    path = Path(zoo) / "manifest.json"
    if not path.is_file():
        raise TinaError(f"{zoo} is not a finished zoo (no manifest.json); build one with `tina zoo build CONFIG`")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TinaError(f"{path} is not valid JSON: {e}") from None
    if man.get("format") != ZOO_FORMAT:
        raise TinaError(f"{path} has format {man.get('format')!r}, expected {ZOO_FORMAT!r}")
    return man


def shard_urls(zoo: str | Path, manifest: dict, split: str) -> list[ShardFile]:
    """The split's shards with their manifest checksums; every one must exist (a zoo copied in part fails
    here, not mid-stream)."""
    sums = manifest.get("shard_sha256") or {}
    if not isinstance(sums, dict):
        raise TinaError(f"{Path(zoo) / 'manifest.json'}: shard_sha256 must be an object of shard name -> sha256")
    paths = [Path(zoo) / n for n in manifest["shards"].get(split, [])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise TinaError(f"{zoo}: {len(missing)} of the {len(paths)} {split} shard(s) in its manifest are missing "
                        f"(e.g. {missing[0]}); copy the whole zoo or rebuild it (a build resumes where it stopped)")
    return [ShardFile(p, sums.get(p.name)) for p in paths]


def iter_split(zoo: str | Path, split: str):
    """Every model of one split, one at a time in shard order (streams: memory holds one shard's worth);
    every shard is verified against its manifest checksum and decoded without pickle (tina/training/shardio.py)."""
    for shard in shard_urls(zoo, read_manifest(zoo), split):
        for m in read_shards([shard]):
            m["params"], m["emb"] = torch.from_numpy(m["params"]), torch.from_numpy(m["emb"])  # (P,), (k, V, E)
            yield m


def load_split(zoo: str | Path, split: str, limit: int | None = None) -> list[dict]:
    """Every model of one split (the first `limit`), decoded into memory (for statistics, validation and evaluation)."""
    return list(itertools.islice(iter_split(zoo, split), limit))


@dataclass
class AugmentConfig:
    """How training examples are varied."""

    permute_classes: bool = True  # random class order per example
    name_prob: float = 0.5  # probability a class is given by its plain name; else a random variant

    def __post_init__(self):
        if not 0 <= self.name_prob <= 1:
            raise ValueError(f"augment.name_prob must be in [0, 1], got {self.name_prob}")


def make_example(params: torch.Tensor, emb: torch.Tensor, layout: ParamLayout, aug: AugmentConfig, rng: random.Random,
                 anchor: SelectionAnchor | None = None, class_ids: list[int] | None = None) -> dict:
    """One model → x0 tokens (T, C), element mask (T, C), per-class text (k, E) and class ids (k,) in the same order.

    With an anchor, x0 is the residual from classifier selection of `class_ids` (tina/anchor.py)."""
    k, V, _ = emb.shape
    order = list(range(k))
    if aug.permute_classes:
        rng.shuffle(order)
    perm = torch.tensor(order)
    rows = params[layout.body_size :].reshape(k, layout.head_dim)[perm]
    flat = torch.cat([params[: layout.body_size], rows.reshape(-1)])
    if anchor is not None:
        flat = flat - anchor.origin(torch.as_tensor(class_ids)[perm])
    variant = torch.tensor([0 if rng.random() < aug.name_prob else rng.randrange(V) for _ in range(k)])
    cond = emb[perm, variant]  # (k, E)
    cond = cond / cond.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # re-normalise after float16 storage
    x0 = layout.tokenize(layout.normalize(flat, k), k)
    ids = torch.full((k,), -1, dtype=torch.long) if class_ids is None else torch.as_tensor(class_ids, dtype=torch.long)[perm]
    return {"x0": x0, "elem_mask": layout.token_mask(k), "cond": cond, "class_ids": ids, "k": k}


def collate(examples: list[dict], layout: ParamLayout) -> dict:
    """Pad to the batch's largest k: x0/elem_mask (N, T, C), cond (N, K, E), cond_mask (N, K), class_ids (N, K) (-1 pads)."""
    K = max(e["k"] for e in examples)
    N, C, E = len(examples), layout.token_size, examples[0]["cond"].shape[-1]
    T = layout.num_tokens(K)
    x0 = torch.zeros(N, T, C)
    elem_mask = torch.zeros(N, T, C, dtype=torch.bool)
    cond = torch.zeros(N, K, E)
    cond_mask = torch.zeros(N, K, dtype=torch.bool)
    class_ids = torch.full((N, K), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        n = layout.num_tokens(e["k"])
        x0[i, :n], elem_mask[i, :n] = e["x0"], e["elem_mask"]
        cond[i, : e["k"]], cond_mask[i, : e["k"]] = e["cond"], True
        class_ids[i, : e["k"]] = e["class_ids"]
    return {"x0": x0, "elem_mask": elem_mask, "cond": cond, "cond_mask": cond_mask, "class_ids": class_ids}


class ZooStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of training examples from the train shards.

    There is one stream per rank and DataLoader worker; each takes every n-th shard when there are enough,
    else all of them. Example n of a stream is a pure function of (seed, stream, n): epoch n // N visits
    the stream's N models in an order drawn from (seed, stream, epoch), and its augmentation draws from
    (seed, stream, n). So a run resumed at global step `start_step` gets exactly the batches the
    uninterrupted run got from that step on.
    """

    def __init__(self, urls: list[ShardFile], layout: ParamLayout, aug: AugmentConfig, seed: int,
                 anchor: SelectionAnchor | None = None, batch_size: int = 1, start_step: int = 0):
        self.urls, self.layout, self.aug, self.seed, self.anchor = urls, layout, aug, seed, anchor
        self.batch_size, self.start_step = batch_size, start_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader takes batch i of this run from worker i % workers, so worker w plays the part
        # of the uninterrupted run's worker (start_step + w) % workers.
        worker = (self.start_step + (info.id if info else 0)) % workers
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        stream, streams = rank * workers + worker, world * workers
        mine = self.urls[stream::streams] if len(self.urls) >= streams else self.urls
        reader = ShardReader()
        items = [(sh, key) for sh in mine for key in reader.keys(sh)]
        if not items:
            raise TinaError(f"the train shards {[str(u) for u in mine]} hold no models")
        n = -(-max(0, self.start_step - worker) // workers) * self.batch_size  # examples this worker already gave
        epoch, order = -1, None
        while True:
            e, i = divmod(n, len(items))
            if e != epoch:
                epoch, order = e, np.random.default_rng([self.seed, stream, e]).permutation(len(items))
            s = reader.read(*items[order[i]])
            rng = random.Random(f"{self.seed}/{stream}/{n}")
            yield make_example(torch.from_numpy(s["params"]), torch.from_numpy(s["emb"]), self.layout, self.aug, rng,
                               self.anchor, s["class_ids"])
            n += 1


def layout_from_manifest(man: dict) -> ParamLayout:
    layout = ParamLayout.from_dict(man["layout"])
    if layout.fingerprint != man["layout_fingerprint"]:
        raise TinaError(f"zoo manifest layout fingerprint {man['layout_fingerprint']} does not match its layout ({layout.fingerprint})")
    return layout


def fit_layout_stats(zoo: str | Path, layout: ParamLayout, limit: int = 4000, anchor: SelectionAnchor | None = None) -> None:
    """Normalisation statistics from (up to `limit` of) the zoo's training models (their residuals
    from classifier selection when there is an anchor)."""
    models = load_split(zoo, "train", limit=limit)
    if not models:
        raise TinaError(f"zoo {zoo} has no training models")
    if anchor is None:
        layout.fit_stats([m["params"] for m in models])
    else:
        layout.fit_stats([m["params"] - anchor.origin(m["class_ids"]) for m in models])


def load_anchor(zoo: str | Path, layout: ParamLayout) -> SelectionAnchor:
    """Classifier selection from the zoo's generic model (generic.safetensors), matched by the
    embeddings of every class's prompt variants (vocab.safetensors). Strictly held-out classes
    (manifest held_out_classes) are not part of it: the generator never hears their names."""
    from safetensors.torch import load_file

    paths = [Path(zoo) / "generic.safetensors", Path(zoo) / "vocab.safetensors"]
    for path in paths:
        if not path.is_file():
            raise TinaError(f"{path} is missing: residual training needs the zoo's generic model and vocabulary "
                            "(or set residual=false)")  # fmt: skip
    held = read_manifest(zoo).get("held_out_classes", [])
    return SelectionAnchor.from_generic(layout, load_file(paths[0]), load_file(paths[1])["variants"], held_out=held)


class ZooDataModule(L.LightningDataModule):
    """Train: the endless shard stream (global batch split across ranks). Val: one dummy batch that
    triggers the generated-accuracy validation in the LightningModule."""

    def __init__(self, zoo: str | Path, layout: ParamLayout, aug: AugmentConfig, batch_size: int, workers: int = 0, seed: int = 0,
                 anchor: SelectionAnchor | None = None):
        super().__init__()
        self.zoo, self.layout, self.aug, self.batch_size, self.workers, self.seed = Path(zoo), layout, aug, batch_size, workers, seed
        self.anchor = anchor
        man = read_manifest(zoo)
        self.urls = shard_urls(zoo, man, "train")
        if not self.urls:
            raise TinaError(f"zoo {zoo} lists no train shards")
        reader = ShardReader()  # verifies every train shard now, not mid-run
        self.num_models = sum(len(reader.keys(u)) for u in self.urls)
        reader.close()
        if self.num_models != man.get("counts", {}).get("train"):
            raise TinaError(f"{Path(zoo) / 'manifest.json'} counts {man.get('counts', {}).get('train')} train models but its "
                            f"shards hold {self.num_models}; the manifest was edited or the zoo is damaged")

    def train_dataloader(self):
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = max(1, self.batch_size // world)
        # Resuming: Lightning restores global_step before it asks for the dataloader.
        step = self.trainer.global_step if self.trainer is not None else 0
        stream = ZooStream(self.urls, self.layout, self.aug, self.seed, self.anchor, batch_size=per_rank, start_step=step)
        return torch.utils.data.DataLoader(
            stream, batch_size=per_rank, num_workers=self.workers,
            collate_fn=functools.partial(collate, layout=self.layout), persistent_workers=self.workers > 0,
        )

    def val_dataloader(self):
        return torch.utils.data.DataLoader([0], batch_size=1)
