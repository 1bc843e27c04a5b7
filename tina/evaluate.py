"""Evaluation protocol: generated models against the oracle and honest baselines, on real test images.

    tina eval [CONFIG.yaml] [key=value ...] [--checkpoint B] [--zoo Z] [--out DIR] [--seeds 3] [--tasks N]

For every zoo split (seen combinations "train", "unseen_combo", "unseen_class") and every task (up to
`tasks` per split), models are generated from several prompt forms and several seeds, all of a seed
in a few batched `Tina.generate_tasks` calls, and measured on the task's real test images
(`tina.accuracy.task_test_set`). Prompt forms (FORMS):

  names            the plain class names (what the generator mostly trained on)
  template         a stored template variant per class ("a photo of a {}", ...), rotating over TEMPLATES
  description      a stored natural-language description per class (tina/assets/descriptions.json)
  heldout_template templates the generator never saw (HELD_OUT_TEMPLATES), re-encoded by the text encoder
  paraphrase       hand-written paraphrases never seen in training (HAND_PARAPHRASES), else heldout_template
  shuffled         the names in a random order; head rows are mapped back before scoring (must NOT hurt)
  random_text      random letter strings instead of class names                   (must hurt)
  unrelated_words  unrelated English words instead of class names                 (must hurt)
  mismatched       another zoo task's classes, scored on this task's images        (must hurt)
  image_Nshot      N random TRAIN images per class as image prompts (needs a projector or an image tower)

Baselines, in the same table and on the same test images (BASELINES):

  oracle     the zoo's fine-tuned model for the task, re-evaluated here (the zoo's own number is kept too)
  selection  classifier selection: the generic model (ZOO/generic.safetensors) with the head rows of the task's classes
  retrieval  the nearest TRAIN-split zoo model by text: for each task class the most similar (cosine of the
             plain-name embeddings) class of a zoo model; the model with the highest mean of those maxima wins
             (ties: closest k). Its body is kept and its head rows are reordered to the task's classes; a class
             it lacks gets the row of its most similar class. Only train-split models are searched, so on the
             train split this is a lookup table (it usually finds the task's own model).
  mean       the mean of the TRAIN-split zoo models: mean body; head row of class c = mean of the rows of c over
             the models that contain c; a class no training model contains gets the mean of all head rows.

The fine-tuning budget: for `finetune.tasks` tasks, start from classifier selection and fine-tune on real
training images with the zoo builder's recipe (Adam, its lr, warm-up + cosine schedule and head lr multiplier,
class-balanced batches of its batch size, its training-image cap) for budgets of S steps (STEP_GRID, a fresh run
per budget); reported: the smallest budget whose test accuracy reaches the generated model's (mean over seeds,
`names` prompts), median over tasks (`finetune_curve`).

Outputs in OUT: results.json (schema RESULTS_FORMAT), results.md (tables), PNG plots, eval_config.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tina.errors import TinaError
from tina.validate import ArgumentParser, check_sampling, writable_folder
from tina.schedule import warmup_cosine

log = logging.getLogger(__name__)
RESULTS_FORMAT = "tina-eval/1"
SPLITS = ("train", "val", "unseen_combo", "unseen_class")
SPLIT_TITLES = {"train": "seen combos", "val": "val combos", "unseen_combo": "unseen combos", "unseen_class": "unseen classes"}
FORMS = ("names", "template", "description", "heldout_template", "paraphrase", "shuffled", "random_text",
         "unrelated_words", "mismatched")
HURTING_FORMS = ("random_text", "unrelated_words", "mismatched")  # the proof that text steers the weights
BASELINES = ("oracle", "selection", "retrieval", "mean")

# Never used to build a zoo (tina/prompts.py TEMPLATES are), so the generator has not seen them.
HELD_OUT_TEMPLATES = (
    "a close-up photograph of {a}",
    "{a} on a plain background",
    "this is {a}",
    "a low-resolution picture showing {a}",
)
# Hand-written paraphrases in words the zoo's descriptions do not use.
HAND_PARAPHRASES = {
    "t-shirt": "a plain tee you would wear to the gym",
    "trouser": "a pair of slacks or chinos",
    "pullover": "a cosy sweater to put on when it gets chilly",
    "dress": "a frock to wear to a summer party",
    "coat": "a winter overcoat",
    "sandal": "a flip-flop style shoe with open toes",
    "shirt": "a button-up blouse with a collar",
    "sneaker": "a trainer for jogging",
    "bag": "a tote or a purse",
    "ankle boot": "a short boot such as a Chelsea boot",
    "apple": "a crunchy red or green fruit",
    "bicycle": "a two-wheeled bike you pedal",
    "cat": "a small furry pet that purrs",
    "dog": "a loyal pet that barks",
    "airplane": "a passenger jet in the sky",
    "automobile": "a family car",
    "bird": "a small feathered animal with wings",
    "deer": "a wild animal with antlers",
    "frog": "a green amphibian that hops",
    "horse": "a large animal people ride",
    "ship": "a big boat on the sea",
    "truck": "a heavy lorry for freight",
}
UNRELATED_WORDS = (
    "algebra", "democracy", "photosynthesis", "parliament", "thunderstorm", "mortgage", "grammar", "volcano",
    "electricity", "jurisdiction", "hypothesis", "inflation", "saxophone", "glacier", "bureaucracy", "astronomy",
    "vaccination", "philosophy", "earthquake", "legislation", "symphony", "erosion", "cryptography", "harvest",
)
STEP_GRID = (0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 70, 100, 150, 200, 300, 400, 500, 700, 1000, 1500, 2000, 3000)


# ---- configuration ----------------------------------------------------------------------------------


@dataclass
class FinetuneBudgetConfig:
    """How many real fine-tuning steps match the generator: run on a subset of tasks."""

    tasks: int = 8  # tasks fine-tuned (0 = skip the budget)
    split: str = "unseen_combo"  # which split's tasks (falls back to the first evaluated split)
    max_steps: int = 0  # largest budget tried; 0: the zoo's own fine-tuning steps (the oracle's budget)
    seed: int = 0

    def __post_init__(self):
        if self.tasks < 0 or self.max_steps < 0:
            raise ValueError("finetune.tasks and finetune.max_steps must be >= 0")


@dataclass
class ExpectConfig:
    """What the zoo and checkpoint must be (a paper setting); unset fields accept anything."""

    dataset: Optional[str] = None  # a tina.datasets name
    target: Optional[str] = None  # e.g. cnn-5k
    text_encoder: Optional[str] = None  # e.g. open_clip:ViT-B-32/openai
    k: Optional[int] = None  # every evaluated task has exactly k classes
    min_tasks: int = 0  # the evaluated splits together hold at least this many tasks
    zoo_config: Optional[str] = None  # named in the error when the zoo is missing
    train_config: Optional[str] = None  # named in the error when the checkpoint is missing


@dataclass
class EvalConfig:
    """`tina eval`: configs/eval/*.yaml merged onto these defaults, then key=value overrides and flags."""

    checkpoint: str = "default"  # generator folder or a shipped name
    zoo: str = "zoos/fashion_mnist"  # the zoo the generator was trained on (tasks, oracles, generic model)
    out: str = "outputs/eval"  # results folder
    data_root: Optional[str] = None  # dataset location (default: the zoo's, else the dataset's own)
    device: str = "cpu"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    splits: list[str] = field(default_factory=lambda: list(SPLITS))  # missing or empty splits are skipped
    tasks: int = 100  # tasks per split (the first ones; 0 = all)
    seeds: int = 3  # generation seeds per task: seed, seed+1, ...
    seed: int = 0
    steps: Optional[int] = None  # sampling steps (default: the checkpoint's)
    sampler: Optional[str] = None  # ddim, dpm or ddpm (default: the checkpoint's)
    guidance: Optional[float] = None  # classifier-free guidance scale (default: the checkpoint's)
    images_per_class: int = 100  # test images per class (the first ones; 0 = all)
    forms: list[str] = field(default_factory=lambda: list(FORMS))  # prompt forms (see FORMS)
    image_shots: list[int] = field(default_factory=lambda: [1, 5])  # image prompts: train images per class
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    batch_size: int = 256  # tasks per generate_tasks call
    eval_batch: int = 4096  # images per forward pass when scoring
    plots: bool = True
    finetune: FinetuneBudgetConfig = field(default_factory=FinetuneBudgetConfig)
    expect: ExpectConfig = field(default_factory=ExpectConfig)

    def __post_init__(self):
        bad = [f for f in self.forms if f not in FORMS]
        if bad:
            raise ValueError(f"unknown prompt forms {bad}; choose from {list(FORMS)}")
        if "names" not in self.forms:
            raise ValueError("forms must include 'names' (the headline numbers and the fine-tuning target use it)")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baselines {bad}; choose from {list(BASELINES)}")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown splits {bad}; choose from {list(SPLITS)}")
        if self.seeds < 1 or self.tasks < 0 or self.batch_size < 1 or self.images_per_class < 0:
            raise ValueError("seeds >= 1, tasks >= 0, batch_size >= 1 and images_per_class >= 0 are required")
        if any(n < 1 for n in self.image_shots):
            raise ValueError(f"image_shots must be positive, got {self.image_shots}")
        check_sampling(steps=self.steps, guidance=self.guidance)  # NaN guidance would score as chance


def load_eval_config(path: str | None = None, overrides: list[str] | tuple = ()) -> EvalConfig:
    from tina.config import load_config

    return load_config(EvalConfig, path, overrides)


# ---- baselines: flat parameter vectors in layout order ------------------------------------------------


def head_rows(layout, flat: torch.Tensor) -> torch.Tensor:
    """(k, D+1) head rows [W_i, b_i] of a flat vector."""
    return flat[layout.body_size :].reshape(-1, layout.head_dim)


def with_rows(layout, body: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """flat = [body | rows]."""
    return torch.cat([body.reshape(-1), rows.reshape(-1)]).float()


def selection_flat(layout, generic: dict[str, torch.Tensor], class_ids: list[int]) -> torch.Tensor:
    """Classifier selection: the generic model's body and the head rows of the task's classes, in task order."""
    ids = torch.as_tensor(list(class_ids), dtype=torch.long)
    state = dict(generic)
    state["head.weight"], state["head.bias"] = generic["head.weight"][ids], generic["head.bias"][ids]
    return layout.flatten(state)


@dataclass
class ZooPool:
    """The training zoo as the retrieval and mean baselines see it (train split only)."""

    keys: list[str]
    class_ids: list[list[int]]
    names_emb: list[torch.Tensor]  # per model (k_j, E), unit rows: plain-name embeddings in head order
    params: list[torch.Tensor]  # per model flat (P_j,)

    @classmethod
    def from_models(cls, models: list[dict]) -> "ZooPool":
        return cls([m["key"] for m in models], [list(m["class_ids"]) for m in models],
                   [F.normalize(m["emb"][:, 0].float(), dim=-1) for m in models], [m["params"] for m in models])

    def __len__(self) -> int:
        return len(self.keys)


def retrieve(pool: ZooPool, query: torch.Tensor) -> dict:
    """Nearest pool model for per-class query embeddings (k, E): its index, score and row map.

    rows[i] = the pool model's head row that serves task class i (its most similar class).
    """
    if not len(pool):
        raise TinaError("the retrieval baseline needs a zoo with training models")
    query = F.normalize(query.float(), dim=-1)
    k = query.shape[0]
    best = None
    for j, emb in enumerate(pool.names_emb):
        sims = query @ emb.T  # (k, k_j)
        top, rows = sims.max(dim=1)
        key = (round(float(top.mean()), 6), -abs(emb.shape[0] - k))  # rounding: exact ties fall to the k rule
        if best is None or key > best[0]:
            best = (key, j, rows)
    (score, _), j, rows = best
    return {"index": j, "key": pool.keys[j], "score": score, "rows": rows.tolist()}


def retrieval_flat(layout, pool: ZooPool, query: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The retrieved model with its head rows reordered to the task's classes."""
    hit = retrieve(pool, query)
    flat = pool.params[hit["index"]]
    rows = head_rows(layout, flat)[hit["rows"]]
    return with_rows(layout, flat[: layout.body_size], rows), hit


def mean_flat(layout, pool: ZooPool, class_ids: list[int]) -> torch.Tensor:
    """Mean body of the pool; per class the mean of its head rows over the pool models that contain it
    (the mean of all head rows for a class no pool model contains)."""
    if not len(pool):
        raise TinaError("the mean baseline needs a zoo with training models")
    body = torch.stack([p[: layout.body_size] for p in pool.params]).mean(0)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for ids, p in zip(pool.class_ids, pool.params):
        for c, row in zip(ids, head_rows(layout, p)):
            sums[c] = sums.get(c, 0) + row
            counts[c] = counts.get(c, 0) + 1
    all_rows = torch.cat([head_rows(layout, p) for p in pool.params]).mean(0)
    rows = torch.stack([sums[c] / counts[c] if c in sums else all_rows for c in class_ids])
    return with_rows(layout, body, rows)


# ---- scoring many models of one task at once -------------------------------------------------------


@torch.no_grad()
def flat_accuracies(bundle, flats: torch.Tensor, k: int, x: torch.Tensor, y: torch.Tensor, eval_batch: int = 4096,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Accuracies (M,) of M models of one task, flats (M, P), on images x (n, C, H, W) with labels y (n,).

    Head-only layouts (frozen backbone): the features are computed once and all M heads applied as one
    matmul. Otherwise one network is built and its weights swapped per model, in channels-last memory
    (about 2x faster convolutions on CPU than NCHW; vmapped grouped convolutions were no faster).
    Models with non-finite weights score chance (1/k), as in validation.
    """
    from tina.targets import get_target

    M = flats.shape[0]
    finite = torch.isfinite(flats).all(dim=1)  # (M,)
    flats = torch.where(finite[:, None], flats, torch.zeros_like(flats))
    layout = bundle.layout
    net = get_target(bundle.target).build(k, bundle.image).to(device).eval()
    correct = torch.zeros(M)
    if layout.body_size == 0:  # every model shares the frozen body: one feature pass
        net.load_state_dict(layout.unflatten(flats[0], k) | bundle.base, strict=True)
        rows = flats.reshape(M, k, layout.head_dim).to(device)  # (M, k, D+1)
        for i in range(0, len(x), eval_batch):
            f = net.features(x[i : i + eval_batch].to(device))  # (b, D)
            logits = torch.einsum("bd,mkd->mbk", f, rows[..., :-1]) + rows[:, None, :, -1]  # (M, b, k)
            correct += (logits.argmax(-1).cpu() == y[i : i + eval_batch][None]).sum(1).float()
    else:
        net = net.to(memory_format=torch.channels_last)
        chunks = [(x[i : i + eval_batch].to(device).contiguous(memory_format=torch.channels_last), y[i : i + eval_batch])
                  for i in range(0, len(x), eval_batch)]
        for j in range(M):
            net.load_state_dict(layout.unflatten(flats[j], k) | bundle.base, strict=True)
            for xb, yb in chunks:
                correct[j] += (net(xb).argmax(-1).cpu() == yb).sum().item()
    acc = correct / max(len(x), 1)
    return torch.where(finite, acc, torch.full_like(acc, 1.0 / k))


# ---- the fine-tuning budget ----------------------------------------------------------------------------


def recipe_lr(step: int, total: int, finetune: dict) -> float:
    """The zoo builder's learning rate at `step` of a `total`-step run (zoo_builder/fit.py lr_at): linear
    warm-up, then cosine decay to zero; the warm-up is scaled to the run's length. Zoos built before the
    schedule existed (no warmup_steps in their config) used a constant rate."""
    lr = float(finetune.get("lr", 1e-3))
    if "warmup_steps" not in finetune:
        return lr
    zoo_steps = max(1, int(finetune.get("steps", total) or total))
    warmup = round(int(finetune["warmup_steps"]) * total / zoo_steps)
    return lr * warmup_cosine(step, total, warmup)


class _TrainPool:
    """Class-balanced minibatches of one task's training images, as the zoo builder draws them."""

    def __init__(self, dataset, class_ids: list[int], per_class: int, gen: torch.Generator):
        pools = []
        for c in class_ids:
            idx = np.flatnonzero(np.asarray(dataset.train_y) == c)
            if per_class and len(idx) > per_class:
                idx = np.sort(idx[torch.randperm(len(idx), generator=gen)[:per_class].numpy()])
            pools.append(torch.from_numpy(idx))
        self.dataset, self.k = dataset, len(class_ids)
        self.counts = torch.tensor([len(p) for p in pools])
        self.order = torch.cat(pools)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.randint(0, self.k, (size,), generator=gen)  # (B,) class positions = labels
        j = (torch.rand(size, generator=gen) * self.counts[pos]).long()
        x, _ = self.dataset.tensors("train", self.order[self.starts[pos] + j].numpy())
        return x, pos


def finetune_curve(bundle, flat0: torch.Tensor, classes: list[str], class_ids: list[int], dataset, x: torch.Tensor,
                   y: torch.Tensor, finetune: dict, max_steps: int, seed: int = 0, target_acc: float | None = None,
                   device: str | torch.device = "cpu") -> dict:
    """Test accuracy after S fine-tuning steps from `flat0`, for the budgets S of STEP_GRID up to max_steps.

    The zoo builder's recipe (`finetune`: the manifest's config["finetune"]): Adam with the zoo's lr (head
    rows at lr * head_lr_mult), class-balanced batches of the zoo's batch size from at most train_per_class
    images per class, and its schedule. With a warm-up + cosine schedule every budget S is a fresh run whose
    schedule spans S steps (reading accuracy midway through one long run would understate what S steps can
    do); with a constant rate one run is read along the way. Returns {"steps", "acc", "seconds" (training
    time of the run that gave each point)}, plus "steps_to_target"/"seconds_to_target" (None when not
    reached) when `target_acc` is given, in which case it stops at the first budget that reaches it.
    """
    from tina.accuracy import accuracy
    from tina.sample import build_model
    from tina.targets import get_target

    spec = get_target(bundle.target)
    batch = int(finetune.get("batch_size", 32))
    head_mult = float(finetune.get("head_lr_mult", 1.0))
    pool = _TrainPool(dataset, class_ids, int(finetune.get("train_per_class", 0) or 0), torch.Generator().manual_seed(seed))
    grid = [s for s in STEP_GRID if s <= max_steps]
    if grid[-1] != max_steps:
        grid.append(max_steps)

    def fresh():
        net = build_model(bundle, flat0, classes).to(device)
        groups = {"head": [], "body": []}
        for n, p in net.named_parameters():
            p.requires_grad_(spec.is_generated(n))
            if spec.is_generated(n):
                groups["head" if n.startswith("head.") else "body"].append(p)
        opt = torch.optim.Adam([g for g in ({"params": groups["head"], "lr_mult": head_mult},
                                             {"params": groups["body"], "lr_mult": 1.0}) if g["params"]])
        return net, opt

    def train(net, opt, start: int, stop: int, total: int, gen: torch.Generator) -> float:
        t0 = time.perf_counter()
        net.train()
        for step in range(start, stop):
            for g in opt.param_groups:
                g["lr"] = recipe_lr(step, total, finetune) * g["lr_mult"]
            xb, yb = pool.batch(batch, gen)
            loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    one_run = "warmup_steps" not in finetune
    out = {"steps": [], "acc": [], "seconds": [], "schedule": "constant lr, one run" if one_run else "warm-up + cosine, a run per budget"}
    net, opt = fresh()
    gen, done, spent = torch.Generator().manual_seed(seed + 1), 0, 0.0
    for budget in grid:
        if one_run:
            spent += train(net, opt, done, budget, max_steps, gen)
            done = budget
        else:
            net, opt = fresh()
            spent = train(net, opt, 0, budget, budget, torch.Generator().manual_seed(seed + 1))
        acc = accuracy(net, x, y)
        out["steps"].append(budget)
        out["acc"].append(acc)
        out["seconds"].append(spent)
        if target_acc is not None and acc >= target_acc:
            break
    if target_acc is not None:
        hit = next((i for i, a in enumerate(out["acc"]) if a >= target_acc), None)
        out["target_acc"] = target_acc
        out["steps_to_target"] = out["steps"][hit] if hit is not None else None
        out["seconds_to_target"] = out["seconds"][hit] if hit is not None else None
    return out


# ---- conditions -------------------------------------------------------------------------------------


def random_string(rng: random.Random) -> str:
    """Two pronounceable-free random 'words' of letters, e.g. 'qzvbt lorpxe'."""
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8))) for _ in range(2))


def mismatched_ids(class_ids: list[int], all_tasks: list[list[int]], num_classes: int, rng: random.Random) -> list[int]:
    """Another zoo task's classes with the same k and no class in the same position (disjoint if possible);
    else k random classes with no positional match."""
    k = len(class_ids)
    same_k = [t for t in all_tasks if len(t) == k and all(a != b for a, b in zip(t, class_ids))]
    disjoint = [t for t in same_k if not set(t) & set(class_ids)]
    pick = disjoint or same_k
    if pick:
        return list(rng.choice(pick))
    others = list(range(num_classes))
    for _ in range(100):
        rng.shuffle(others)
        if all(a != b for a, b in zip(others[:k], class_ids)):
            return others[:k]
    return others[:k]


def _rng(*parts) -> random.Random:
    """A generator seeded by the parts' repr (stable across processes, unlike hash() of strings)."""
    return random.Random(repr(parts))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class Conditions:
    """Builds the per-class conditioning (k, E) of every prompt form for one task."""

    def __init__(self, man: dict, vocab_names: torch.Tensor, encoder, seed: int, notes: list[str]):
        from tina.prompts import NUM_VARIANTS, TEMPLATES, fill_template

        self.man, self.vocab_names, self.encoder, self.seed, self.notes = man, vocab_names, encoder, seed, notes
        self.n_templates, self.num_variants = len(TEMPLATES), int(man.get("num_variants", NUM_VARIANTS))
        self.stored_ok = self.num_variants == NUM_VARIANTS
        self.fill = fill_template
        self.all_tasks = [list(v) for v in man.get("tasks", {}).values()]
        self._cache: dict[str, torch.Tensor] = {}

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(n, E) embeddings; one encoder call for all texts not seen before."""
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            for t, e in zip(new, self.encoder.encode(new)):
                self._cache[t] = e.float()
        return torch.stack([self._cache[t] for t in texts])

    def texts(self, form: str, m: dict, split_i: int, i: int) -> list[str] | None:
        """The strings a text-encoder form feeds for task i (None for forms built from stored embeddings)."""
        rng = _rng(self.seed, split_i, i, form)
        classes = m["classes"]
        if form == "heldout_template":
            return [self.fill(HELD_OUT_TEMPLATES[(i + j) % len(HELD_OUT_TEMPLATES)], c) for j, c in enumerate(classes)]
        if form == "paraphrase":
            return [HAND_PARAPHRASES.get(c) or self.fill(HELD_OUT_TEMPLATES[(i + j) % len(HELD_OUT_TEMPLATES)], c)
                    for j, c in enumerate(classes)]
        if form == "random_text":
            return [random_string(rng) for _ in classes]
        if form == "unrelated_words":
            return rng.sample(UNRELATED_WORDS, len(classes))
        return None

    def cond(self, form: str, m: dict, split_i: int, i: int) -> tuple[torch.Tensor, list[int] | None]:
        """(k, E) conditioning and, for `shuffled`, the permutation (generated row j is class perm[j])."""
        emb, k = m["emb"], len(m["classes"])
        if form == "names":
            return _unit(emb[:, 0]), None
        if form == "template":
            return _unit(torch.stack([emb[j, 1 + (i + j) % self.n_templates] for j in range(k)])), None
        if form == "description":
            n_desc = self.num_variants - 1 - self.n_templates
            return _unit(torch.stack([emb[j, 1 + self.n_templates + (i + j) % n_desc] for j in range(k)])), None
        if form == "shuffled":
            rng = _rng(self.seed, split_i, i, form)
            perm = list(range(k))
            while k > 1 and perm == list(range(k)):
                rng.shuffle(perm)
            return _unit(emb[perm, 0]), perm
        if form == "mismatched":
            rng = _rng(self.seed, split_i, i, form)
            ids = mismatched_ids(list(m["class_ids"]), self.all_tasks, self.vocab_names.shape[0], rng)
            return _unit(self.vocab_names[ids]), None
        texts = self.texts(form, m, split_i, i)
        if self.encoder is None:  # random_text / unrelated_words without an encoder: random unit vectors
            g = torch.Generator().manual_seed(_rng(self.seed, split_i, i, form).getrandbits(63))
            return _unit(torch.randn(k, emb.shape[-1], generator=g)), None
        return _unit(self.encode(texts)), None


# ---- the evaluation --------------------------------------------------------------------------------


def _check_setting(cfg: EvalConfig):
    """A setting with `expect` (a paper setting) lists every missing piece at once; returns the dataset if loaded."""
    from tina.datasets import load_dataset
    from tina.sample import resolve_checkpoint
    from tina.text import get_text_encoder

    ex, missing, dataset = cfg.expect, [], None
    zoo_cfg, train_cfg = ex.zoo_config or "configs/zoo/<name>.yaml", ex.train_config or "configs/train/<name>.yaml"
    if ex.dataset is not None:
        try:
            dataset = load_dataset(ex.dataset, cfg.data_root)
        except TinaError as e:
            missing.append(f"dataset {ex.dataset}: {e}")
    if ex.text_encoder is not None:
        try:
            get_text_encoder(ex.text_encoder)  # resolves the weights file without loading it
        except TinaError as e:
            missing.append(f"text encoder: {e}")
    if not (Path(cfg.zoo) / "manifest.json").is_file():
        what = ", ".join(f"{n} {v}" for n, v in (("dataset", ex.dataset), ("target", ex.target),
                                                  ("text_encoder", ex.text_encoder), ("k", ex.k)) if v is not None)
        missing.append(f"zoo {cfg.zoo!r} does not exist: build one ({what}) with `tina zoo build {zoo_cfg} out={cfg.zoo}`")
    try:
        resolve_checkpoint(cfg.checkpoint)
    except TinaError:
        missing.append(f"checkpoint {cfg.checkpoint!r} does not exist: train one on the zoo with "
                       f"`tina train {train_cfg} zoo={cfg.zoo} out=RUN` and pass --checkpoint RUN/bundle")
    if missing:
        raise TinaError("this evaluation setting cannot run here:\n  - " + "\n  - ".join(missing))
    return dataset


def _resolve_inputs(cfg: EvalConfig):
    """Zoo manifest, Tina, dataset; every missing piece is a TinaError that says how to get it."""
    from tina.data import read_manifest
    from tina.datasets import load_dataset
    from tina.sample import Tina, resolve_checkpoint

    checked = ("dataset", "target", "text_encoder", "k", "min_tasks")
    dataset = _check_setting(cfg) if any(getattr(cfg.expect, n) not in (None, 0) for n in checked) else None
    zoo = Path(cfg.zoo)
    if not (zoo / "manifest.json").is_file():
        raise TinaError(
            f"zoo {str(zoo)!r} not found (no manifest.json): build the zoo the generator was trained on with "
            f"`tina zoo build configs/zoo/<name>.yaml out={zoo}`, or pass --zoo"
        )
    man = read_manifest(zoo)
    ex = cfg.expect
    for what, want, have in (("dataset", ex.dataset, man["dataset"]["name"]), ("target", ex.target, man["target"]),
                             ("text encoder", ex.text_encoder, man["text_encoder"])):
        if want is not None and want != have:
            raise TinaError(f"zoo {zoo} was built with {what} {have!r}, but this evaluation setting needs {want!r}")
    try:
        resolve_checkpoint(cfg.checkpoint)
    except TinaError as e:
        raise TinaError(f"{e}; train a generator on this zoo with `tina train configs/train/<name>.yaml zoo={zoo}` "
                        "(its bundle is RUN/bundle) and pass --checkpoint RUN/bundle") from None
    tina = Tina.from_pretrained(cfg.checkpoint, device=cfg.device)
    b = tina.bundle
    # Flat vectors do not depend on the token size (a generator may re-tokenize its zoo): compare the rest.
    if {**b.layout.to_dict(), "token_size": 0} != {**man["layout"], "token_size": 0}:
        raise TinaError(f"checkpoint {cfg.checkpoint} (layout {b.fingerprint}) generates other parameter vectors than zoo "
                        f"{zoo} holds (layout {man['layout_fingerprint']}): evaluate a generator on the zoo it was trained on")
    if b.text_encoder != man["text_encoder"]:
        raise TinaError(f"checkpoint {cfg.checkpoint} uses text encoder {b.text_encoder!r}, zoo {zoo} {man['text_encoder']!r}")
    if dataset is None or dataset.name != man["dataset"]["name"]:
        dataset = load_dataset(man["dataset"]["name"], cfg.data_root or man["dataset"].get("root"))
    return zoo, man, tina, dataset


def _encoder_or_none(tina, notes: list[str]):
    try:
        return tina.encoder.load()
    except TinaError as e:
        notes.append(f"text encoder unavailable ({e}); random text uses random unit vectors, "
                     "held-out templates and paraphrases are skipped")
        return None


def _image_prompt_ok(tina, notes: list[str]) -> bool:
    b = tina.bundle
    if b.projector:
        return True
    try:
        if getattr(tina.encoder, "has_image_tower", False):
            return True
    except TinaError:
        pass
    notes.append(f"image prompts skipped: the checkpoint has no image projector and its encoder {b.text_encoder!r} no "
                 "image tower (add a projector with `python -m tina.projector CHECKPOINT`)")
    return False


def _sample_images(dataset, class_ids: list[int], n: int, rng: np.random.Generator) -> list[torch.Tensor]:
    y = np.asarray(dataset.train_y)
    out = []
    for c in class_ids:
        idx = np.flatnonzero(y == c)
        x, _ = dataset.tensors("train", np.sort(rng.choice(idx, min(n, len(idx)), replace=False)))
        out.append(x)
    return out


def _generate(tina, items: list[tuple], seed: int, cfg: EvalConfig, bar) -> dict:
    """items: (item_id, Task). All of them in batched generate_tasks calls (grouped by k); item_id → flat."""
    items = sorted(items, key=lambda it: len(it[1].classes))
    out = {}

    def run(chunk):
        try:
            nets = tina.generate_tasks([t for _, t in chunk], seed=seed, steps=cfg.steps, guidance=cfg.guidance,
                                       sampler=cfg.sampler)
        except TinaError:  # non-finite weights somewhere: narrow down, the bad task scores chance
            if len(chunk) == 1:
                out[chunk[0][0]] = torch.full((tina.bundle.layout.num_params(len(chunk[0][1].classes)),), float("nan"))
                return
            half = len(chunk) // 2
            run(chunk[:half])
            run(chunk[half:])
            return
        for (key, _), net in zip(chunk, nets):
            out[key] = tina.bundle.layout.flatten(net.state_dict())

    for lo in range(0, len(items), cfg.batch_size):
        chunk = items[lo : lo + cfg.batch_size]
        run(chunk)
        bar.update(len(chunk))
    return out


def _summary(values: np.ndarray) -> dict:
    """values (tasks, seeds) → mean, std over tasks (of seed means), std over seeds (of task means)."""
    values = np.asarray(values, dtype=np.float64)
    per_task = values.mean(1)
    per_seed = values.mean(0)
    return {"mean": float(per_task.mean()), "std_tasks": float(per_task.std(ddof=1)) if len(per_task) > 1 else 0.0,
            "std_seeds": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0, "per_seed": per_seed.round(5).tolist(),
            "n_tasks": int(values.shape[0]), "n_seeds": int(values.shape[1])}


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    """mean of a - b over tasks with its standard error."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se}


def evaluate(cfg: EvalConfig) -> dict:
    """Run the protocol; write results.json, results.md, plots and the resolved config to cfg.out; return the results."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from tina.accuracy import task_test_set
    from tina.config import save_config, to_dict
    from tina.data import load_split
    from tina.sample import Task

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    zoo, man, tina, dataset = _resolve_inputs(cfg)
    bundle, layout = tina.bundle, tina.bundle.layout
    out = writable_folder(cfg.out, "out")
    save_config(cfg, out / "eval_config.yaml")
    notes: list[str] = []

    # -- the tasks ------------------------------------------------------------------------------
    train_models = load_split(zoo, "train")
    pool = ZooPool.from_models(train_models)
    limit = cfg.tasks or None
    splits: dict[str, list[dict]] = {}
    for s in cfg.splits:
        models = train_models[:limit] if s == "train" else load_split(zoo, s, limit=limit)
        if models:
            splits[s] = models
        else:
            notes.append(f"split {s!r} skipped: the zoo has no models in it")
    if not splits:
        raise TinaError(f"zoo {zoo} has no models in the splits {cfg.splits}")
    ex = cfg.expect
    n_tasks = sum(len(v) for v in splits.values())
    if n_tasks < ex.min_tasks:
        raise TinaError(f"this setting evaluates at least {ex.min_tasks} tasks; zoo {zoo} provides {n_tasks} in {list(splits)}")
    if ex.k is not None:
        bad = sorted({len(m["classes"]) for v in splits.values() for m in v} - {ex.k})
        if bad:
            raise TinaError(f"this setting needs tasks of exactly {ex.k} classes; zoo {zoo} has tasks with k={bad}")

    # -- conditions -----------------------------------------------------------------------------
    forms = list(cfg.forms)
    needs_encoder = {"heldout_template", "paraphrase", "random_text", "unrelated_words"} & set(forms)
    encoder = _encoder_or_none(tina, notes) if needs_encoder else None
    if encoder is None:
        forms = [f for f in forms if f not in ("heldout_template", "paraphrase")]
    vocab_path = zoo / "vocab.safetensors"
    vocab_names = load_file(vocab_path)["names"].float() if vocab_path.is_file() else bundle.vocab_emb.float()
    conds = Conditions(man, vocab_names, encoder, cfg.seed, notes)
    if not conds.stored_ok:
        notes.append(f"zoo has {conds.num_variants} variants per class, not tina.prompts' layout: template/description skipped")
        forms = [f for f in forms if f not in ("template", "description")]
    image_forms = [f"image_{n}shot" for n in cfg.image_shots] if cfg.image_shots and _image_prompt_ok(tina, notes) else []
    all_forms = forms + image_forms
    seeds = [cfg.seed + i for i in range(cfg.seeds)]

    tasks_by_form: dict[tuple, Task] = {}  # (split, form, i) -> Task (same for every seed)
    perms: dict[tuple, list[int]] = {}
    for si, (s, models) in enumerate(splits.items()):
        if encoder is not None:  # one encoder call for all texts of the split
            conds.encode([t for f in forms for i, m in enumerate(models) for t in (conds.texts(f, m, si, i) or [])])
        for i, m in enumerate(models):
            for f in forms:
                c, perm = conds.cond(f, m, si, i)
                names = [m["classes"][j] for j in perm] if perm else list(m["classes"])
                tasks_by_form[(s, f, i)] = Task(names, f, c)
                if perm:
                    perms[(s, f, i)] = perm

    # -- generation: every (split, form, task) of a seed in batched calls ------------------------------
    flats: dict[tuple, torch.Tensor] = {}  # (split, form, i, seed) -> flat, head rows in the task's class order
    total = len(seeds) * (len(tasks_by_form) + sum(len(v) for v in splits.values()) * len(image_forms))
    t_gen = time.perf_counter()
    with tqdm(total=total, desc="generate", unit="model", disable=None) as bar:
        for seed in seeds:
            items = [((key, seed), task) for key, task in tasks_by_form.items()]
            if image_forms:
                rng = np.random.default_rng(seed)
                for s, models in splits.items():
                    for i, m in enumerate(models):
                        for f, n in zip(image_forms, cfg.image_shots):
                            imgs = _sample_images(dataset, m["class_ids"], n, rng)
                            task = tina.make_task(classes=list(m["classes"]), images=dict(zip(m["classes"], imgs)))
                            items.append((((s, f, i), seed), task))
            for ((s, f, i), sd), flat in _generate(tina, items, seed, cfg, bar).items():
                perm = perms.get((s, f, i))
                if perm:  # generated row j belongs to class perm[j]: put it back in the task's order
                    rows = head_rows(layout, flat)
                    restored = torch.empty_like(rows)
                    restored[perm] = rows
                    flat = with_rows(layout, flat[: layout.body_size], restored)
                flats[(s, f, i, sd)] = flat
    gen_seconds = time.perf_counter() - t_gen

    # -- baselines and scoring, one task at a time ----------------------------------------------------
    generic = load_file(zoo / "generic.safetensors") if "selection" in cfg.baselines or cfg.finetune.tasks else None
    per_class = cfg.images_per_class or None
    results: dict = {"format": RESULTS_FORMAT, "checkpoint": str(bundle.path), "zoo": str(zoo),
                     "dataset": dataset.name, "target": bundle.target, "text_encoder": bundle.text_encoder,
                     "generator": bundle.meta.get("training", {}), "seeds": seeds, "forms": all_forms,
                     "baselines": list(cfg.baselines), "config": to_dict(cfg), "splits": {}}
    n_models = 0
    with tqdm(total=sum(len(v) for v in splits.values()), desc="score", unit="task", disable=None) as bar:
        for s, models in splits.items():
            per_task = []
            for i, m in enumerate(models):
                k = len(m["classes"])
                x, y = task_test_set(dataset, m["class_ids"], per_class)
                rows, names = [], []
                for f in all_forms:
                    for sd in seeds:
                        rows.append(flats[(s, f, i, sd)])
                        names.append((f, sd))
                hit = None
                for b in cfg.baselines:
                    if b == "oracle":
                        rows.append(m["params"])
                    elif b == "selection":
                        rows.append(selection_flat(layout, generic, m["class_ids"]))
                    elif b == "retrieval":
                        flat, hit = retrieval_flat(layout, pool, _unit(m["emb"][:, 0]))
                        rows.append(flat)
                    elif b == "mean":
                        rows.append(mean_flat(layout, pool, m["class_ids"]))
                    names.append((b, None))
                acc = flat_accuracies(bundle, torch.stack(rows), k, x, y, cfg.eval_batch, cfg.device).tolist()
                n_models += len(rows)
                rec = {"key": m["key"], "classes": list(m["classes"]), "class_ids": list(m["class_ids"]), "k": k,
                       "test_images": int(len(y)), "zoo_oracle": m["metrics"].get("oracle_acc"),
                       "zoo_selection": m["metrics"].get("selection_acc"), "generated": {f: [] for f in all_forms}}
                for (name, sd), a in zip(names, acc):
                    if sd is None:
                        rec[name] = a
                    else:
                        rec["generated"][name].append(a)
                if hit is not None:
                    rec["retrieved"] = {"key": hit["key"], "score": hit["score"], "rows": hit["rows"]}
                per_task.append(rec)
                bar.update(1)
            results["splits"][s] = _split_summary(per_task, all_forms, cfg.baselines)

    # -- fine-tuning budget --------------------------------------------------------------------------
    if cfg.finetune.tasks and generic is not None:
        results["finetune_budget"] = _finetune_budget(cfg, man, bundle, dataset, splits, results, generic)

    for s, r in results["splits"].items():
        h = r["headline"]
        if "gain_captured" in h and h["oracle"] - h["selection"] < 0.02:
            notes.append(f"{s}: oracle − selection is only {h['oracle'] - h['selection']:.3f}, so gain captured "
                         f"({h['gain_captured']:.2f}) is dominated by noise; compare accuracies directly")
    main_split = "unseen_combo" if "unseen_combo" in results["splits"] else next(iter(results["splits"]))
    results["headline"] = {"split": main_split, **results["splits"][main_split]["headline"]}
    results["notes"] = notes
    results["timing"] = {"seconds": round(time.perf_counter() - t_start, 1), "generation_seconds": round(gen_seconds, 1),
                         "generated_models": len(flats), "models_per_second": round(len(flats) / max(gen_seconds, 1e-9), 1),
                         "scored_models": n_models, "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_markdown(results))
    if cfg.plots:
        results["plots"] = write_plots(results, out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    log.info("evaluation written to %s in %.0f s", out, results["timing"]["seconds"])
    return results


def _split_summary(per_task: list[dict], forms: list[str], baselines: list[str]) -> dict:
    """Means ± stds per form and baseline, the checks, the headline and accuracy by k for one split."""
    gen = {f: np.array([t["generated"][f] for t in per_task]) for f in forms}  # (tasks, seeds)
    base = {b: np.array([[t[b]] for t in per_task]) for b in baselines}
    out = {"tasks": len(per_task), "generated": {f: _summary(v) for f, v in gen.items()},
           "baselines": {b: _summary(v) for b, v in base.items()}}
    zoo_oracle = [t["zoo_oracle"] for t in per_task if t["zoo_oracle"] is not None]
    if zoo_oracle:
        out["baselines"].setdefault("oracle", {})["zoo_mean"] = float(np.mean(zoo_oracle))
    names = gen["names"].mean(1)
    g = float(names.mean())
    head: dict = {"generated": g}
    if "oracle" in base:
        o = float(base["oracle"].mean())
        head["oracle"], head["ratio_to_oracle"] = o, g / o if o > 0 else float("nan")
    if "selection" in base:
        head["selection"] = float(base["selection"].mean())
    if "oracle" in base and "selection" in base:
        o, s = head["oracle"], head["selection"]
        head["gain_captured"] = (g - s) / (o - s) if o - s > 1e-9 else float("nan")
    checks = {}
    if "shuffled" in gen:  # equivariance: permuting the prompt must not change accuracy beyond noise
        p = _paired(gen["shuffled"].mean(1), names)
        seed_noise = float(np.mean(gen["names"].std(1, ddof=1))) if gen["names"].shape[1] > 1 else 0.0
        p["ok"] = bool(abs(p["diff"]) <= max(2 * p["se"], 0.01) if not math.isnan(p["se"]) else abs(p["diff"]) <= 0.01)
        p["seed_noise"] = seed_noise
        checks["shuffled_vs_names"] = p
    for f in HURTING_FORMS:  # text must steer the weights: wrong text must lose accuracy
        if f in gen:
            p = _paired(names, gen[f].mean(1))
            p["ok"] = bool(p["diff"] > 2 * p["se"]) if not math.isnan(p["se"]) else bool(p["diff"] > 0)
            checks[f"names_minus_{f}"] = p
    head["checks"] = checks
    out["headline"] = head
    by_k: dict = {}
    for k in sorted({t["k"] for t in per_task}):
        idx = [j for j, t in enumerate(per_task) if t["k"] == k]
        row = {"n": len(idx), "generated": float(names[idx].mean()), "chance": 1.0 / k}
        for b in baselines:
            row[b] = float(base[b][idx].mean())
        by_k[str(k)] = row
    out["by_k"] = by_k
    out["per_task"] = per_task
    return out


def _finetune_budget(cfg, man, bundle, dataset, splits, results, generic) -> dict:
    """Fine-tuning steps from classifier selection to each task's generated accuracy; median over tasks."""
    from tqdm.auto import tqdm

    from tina.accuracy import task_test_set

    split = cfg.finetune.split if cfg.finetune.split in splits else next(iter(splits))
    ft = man.get("config", {}).get("finetune", {})
    max_steps = cfg.finetune.max_steps or int(ft.get("steps", 100))
    per_task, t0 = [], time.perf_counter()
    records = results["splits"][split]["per_task"]
    for i, m in enumerate(tqdm(splits[split][: cfg.finetune.tasks], desc="fine-tune budget", unit="task", disable=None)):
        target = float(np.mean(records[i]["generated"]["names"]))
        x, y = task_test_set(dataset, m["class_ids"], cfg.images_per_class or None)
        curve = finetune_curve(bundle, selection_flat(bundle.layout, generic, m["class_ids"]), list(m["classes"]),
                               list(m["class_ids"]), dataset, x, y, ft, max_steps, seed=cfg.finetune.seed + i,
                               target_acc=target, device=cfg.device)
        curve.update(key=m["key"], k=len(m["classes"]))
        per_task.append(curve)
    steps = [c["steps_to_target"] if c["steps_to_target"] is not None else math.inf for c in per_task]
    med = float(np.median(steps)) if steps else float("nan")
    secs = [c["seconds_to_target"] for c in per_task if c["seconds_to_target"] is not None]
    return {"split": split, "tasks": len(per_task), "max_steps": max_steps,
            "recipe": {"optimizer": "Adam", "lr": ft.get("lr"), "warmup_steps": ft.get("warmup_steps"),
                       "head_lr_mult": ft.get("head_lr_mult", 1.0), "batch_size": ft.get("batch_size"),
                       "train_per_class": ft.get("train_per_class"), "init": "classifier selection", "zoo_steps": ft.get("steps"),
                       "schedule": per_task[0]["schedule"] if per_task else None},
            "median_steps": med if math.isfinite(med) else None,
            "median_steps_text": (f"{med:g}" if math.isfinite(med) else f"> {max_steps}"),
            "reached": int(sum(math.isfinite(s) for s in steps)),
            "median_seconds_reached": float(np.median(secs)) if secs else None,
            "seconds": round(time.perf_counter() - t0, 1), "per_task": per_task}


# ---- reports ----------------------------------------------------------------------------------------


def _fmt(d: dict | None) -> str:
    if not d or "mean" not in d:
        return "–"
    s = f"{d['mean']:.3f} ± {d['std_tasks']:.3f}"
    if d.get("n_seeds", 1) > 1:
        s += f" (seeds ± {d['std_seeds']:.3f})"
    return s


def results_markdown(r: dict) -> str:
    """The tables of results.md: one row per method, one column per split."""
    splits = list(r["splits"])
    lines = [f"# Tina evaluation: {r['dataset']} / {r['target']} / {r['text_encoder']}", "",
             f"checkpoint `{r['checkpoint']}`, zoo `{r['zoo']}`, seeds {r['seeds']}. Accuracy on real test images, "
             "mean ± std over tasks (± std over seeds of the task mean).", "",
             "| method | " + " | ".join(f"{SPLIT_TITLES.get(s, s)} (n={r['splits'][s]['tasks']})" for s in splits) + " |",
             "|---|" + "---|" * len(splits)]
    for b in r["baselines"]:
        lines.append(f"| {b} | " + " | ".join(_fmt(r["splits"][s]["baselines"].get(b)) for s in splits) + " |")
    for f in r["forms"]:
        label = "**generated: names**" if f == "names" else f"generated: {f}"
        lines.append(f"| {label} | " + " | ".join(_fmt(r["splits"][s]["generated"].get(f)) for s in splits) + " |")
    lines += ["", "## Headline", "", "| split | generated | oracle | selection | generated / oracle | gain captured |",
              "|---|---|---|---|---|---|"]
    for s in splits:
        h = r["splits"][s]["headline"]
        lines.append(f"| {SPLIT_TITLES.get(s, s)} | {h['generated']:.3f} | {h.get('oracle', float('nan')):.3f} | "
                     f"{h.get('selection', float('nan')):.3f} | {h.get('ratio_to_oracle', float('nan')):.3f} | "
                     f"{h.get('gain_captured', float('nan')):.3f} |")
    lines += ["", "gain captured = (generated − selection) / (oracle − selection).", "", "## Does the text steer the weights?", "",
              "| split | check | difference | s.e. | as expected |", "|---|---|---|---|---|"]
    for s in splits:
        for name, c in r["splits"][s]["headline"]["checks"].items():
            lines.append(f"| {SPLIT_TITLES.get(s, s)} | {name} | {c['diff']:+.3f} | {c['se']:.3f} | {'yes' if c['ok'] else '**no**'} |")
    lines += ["", "shuffled_vs_names must be ≈ 0 (equivariance); names_minus_X must be > 0 (wrong text hurts).", "",
              "## Accuracy by k", ""]
    for s in splits:
        by_k = r["splits"][s]["by_k"]
        cols = ["generated"] + [b for b in r["baselines"]] + ["chance"]
        lines += [f"{SPLIT_TITLES.get(s, s)}:", "", "| k | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for k, row in by_k.items():
            lines.append(f"| {k} | {row['n']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        lines.append("")
    fb = r.get("finetune_budget")
    if fb:
        rec = fb["recipe"]
        lines += ["## Fine-tuning budget", "",
                  f"Fine-tuning from classifier selection ({rec['optimizer']}, lr {rec['lr']}, batch {rec['batch_size']}, "
                  f"zoo oracle = {rec['zoo_steps']} steps) needs a median of **{fb['median_steps_text']} steps** to reach the "
                  f"generated model's accuracy ({fb['reached']}/{fb['tasks']} {SPLIT_TITLES.get(fb['split'], fb['split'])} tasks "
                  f"reached it within {fb['max_steps']} steps).", ""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    t = r["timing"]
    lines += [f"{t['generated_models']} models generated in {t['generation_seconds']} s ({t['models_per_second']} models/s); "
              f"whole evaluation {t['seconds']} s.", ""]
    return "\n".join(lines)


def write_plots(r: dict, out: Path) -> list[str]:
    """accuracy_by_split.png, prompt_forms.png, accuracy_vs_k.png and (if run) finetune_budget.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    splits = list(r["splits"])
    titles = [SPLIT_TITLES.get(s, s) for s in splits]

    # methods side by side per split
    methods = [(b, lambda s, b=b: r["splits"][s]["baselines"].get(b)) for b in r["baselines"]]
    methods.insert(1 if "oracle" in r["baselines"] else 0, ("generated", lambda s: r["splits"][s]["generated"]["names"]))
    methods += [(f, lambda s, f=f: r["splits"][s]["generated"].get(f)) for f in HURTING_FORMS if f in r["forms"]]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(splits) + 2), 4))
    w = 0.8 / len(methods)
    for j, (name, get) in enumerate(methods):
        vals = [get(s) or {"mean": np.nan, "std_tasks": 0} for s in splits]
        ax.bar(np.arange(len(splits)) + (j - (len(methods) - 1) / 2) * w, [v["mean"] for v in vals], w,
               yerr=[v["std_tasks"] for v in vals], capsize=2, label=name)
    ax.set_xticks(np.arange(len(splits)), titles)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("generated models vs baselines")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_split.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_by_split.png")

    # prompt forms (error bars: std over seeds)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(r["forms"]) * len(splits) + 2), 4))
    w = 0.8 / len(splits)
    for j, s in enumerate(splits):
        vals = [r["splits"][s]["generated"][f] for f in r["forms"]]
        ax.bar(np.arange(len(r["forms"])) + (j - (len(splits) - 1) / 2) * w, [v["mean"] for v in vals], w,
               yerr=[v["std_seeds"] for v in vals], capsize=2, label=SPLIT_TITLES.get(s, s))
    ax.set_xticks(np.arange(len(r["forms"])), r["forms"], rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("prompt forms (error bars: std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "prompt_forms.png", dpi=120)
    plt.close(fig)
    written.append("prompt_forms.png")

    # accuracy vs k
    fig, axes = plt.subplots(1, len(splits), figsize=(4 * len(splits), 3.5), squeeze=False, sharey=True)
    for ax, s, title in zip(axes[0], splits, titles):
        by_k = r["splits"][s]["by_k"]
        ks = [int(k) for k in by_k]
        for name in ["generated", *r["baselines"], "chance"]:
            ax.plot(ks, [by_k[str(k)][name] for k in ks], "o-" if name != "chance" else "k--", label=name, ms=3)
        ax.set_title(title)
        ax.set_xlabel("k (classes)")
        ax.set_xticks(ks)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_vs_k.png")

    fb = r.get("finetune_budget")
    if fb and fb["per_task"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, c in enumerate(fb["per_task"]):
            line = ax.plot([max(s, 0.5) for s in c["steps"]], c["acc"], "-", alpha=0.7)[0]
            ax.axhline(c["target_acc"], color=line.get_color(), ls=":", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning steps from classifier selection (0 drawn at 0.5)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"fine-tuning budget: median {fb['median_steps_text']} steps (dotted: generated)")
        fig.tight_layout()
        fig.savefig(out / "finetune_budget.png", dpi=120)
        plt.close(fig)
        written.append("finetune_budget.png")
    return written


# ---- CLI ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from tina.diffusion import SAMPLERS

    ap = ArgumentParser(
        prog="tina eval", description="Evaluate a generator on a zoo: generated models vs oracle and baselines.",
        epilog="Example: tina eval configs/eval/fashion_mnist.yaml --checkpoint runs/fashion_mnist/bundle --tasks 50")
    ap.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                    help="an optional configs/eval/*.yaml, then EvalConfig overrides such as finetune.tasks=4")
    ap.add_argument("--checkpoint", help="generator folder (or 'default')")
    ap.add_argument("--zoo", help="the zoo the generator was trained on")
    ap.add_argument("--out", help="results folder")
    ap.add_argument("--seeds", type=int, help="generation seeds per task")
    ap.add_argument("--tasks", type=int, help="tasks per split (0 = all)")
    ap.add_argument("--steps", type=int, help="sampling steps")
    ap.add_argument("--sampler", choices=SAMPLERS)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--data-root", help="dataset location")
    ap.add_argument("--device")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(config) > 1:
        raise TinaError(f"give at most one config file, got {config}")
    flags = {"checkpoint": args.checkpoint, "zoo": args.zoo, "out": args.out, "seeds": args.seeds, "tasks": args.tasks,
             "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance, "data_root": args.data_root,
             "device": args.device}
    overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_eval_config(config[0] if config else None, overrides)
    r = evaluate(cfg)
    h = r["headline"]
    print(results_markdown(r).split("## Accuracy by k")[0].rstrip())
    print(f"\n{SPLIT_TITLES.get(h['split'], h['split'])}: generated {h['generated']:.3f}, "
          f"generated/oracle {h.get('ratio_to_oracle', float('nan')):.3f}, gain captured {h.get('gain_captured', float('nan')):.3f}")
    print(f"results: {Path(cfg.out) / 'results.json'}, {Path(cfg.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
