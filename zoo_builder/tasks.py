"""Tasks: which classes each personalized model separates, and in which order.

A task is an ordered list of k distinct class ids (head row i = class ids[i]). Splits:
  train         what the generator learns from;
  val           held-out class sets for choosing a generator's settings (validation during training),
                disjoint from train and from unseen_combo, so unseen_combo stays a clean test split;
  unseen_combo  held-out class SETS: every class occurs in train, but never this combination;
  unseen_class  tasks with at least one held-out class, a class that occurs in no train task.
The sampler is a pure function of (number of classes, TasksConfig): same seed, same tasks.
Task ids are "task-NNNNNN", numbered through the splits in the order above.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from tina.errors import TinaError

SPLITS = ("train", "val", "unseen_combo", "unseen_class")


@dataclass(frozen=True)
class Task:
    """One personalized model to build."""

    task_id: str  # "task-000123"; also the webdataset key of its sample
    split: str  # one of SPLITS
    classes: tuple[int, ...]  # class ids in head order


@dataclass
class TaskPlan:
    """Every task of a zoo plus the held-out classes; written into the manifest."""

    tasks: list[Task]
    held_out_classes: list[int]

    def split(self, name: str) -> list[Task]:
        return [t for t in self.tasks if t.split == name]

    def to_dict(self) -> dict:
        return {
            "held_out_classes": self.held_out_classes,
            "splits": {s: [t.task_id for t in self.split(s)] for s in SPLITS},
            "tasks": {t.task_id: list(t.classes) for t in self.tasks},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TaskPlan":
        tasks = [Task(tid, s, tuple(d["tasks"][tid])) for s in SPLITS for tid in d["splits"].get(s, [])]
        return cls(tasks, list(d["held_out_classes"]))


def task_id(i: int) -> str:
    return f"task-{i:06d}"


def task_number(tid: str) -> int:
    """task_id's inverse: "task-000123" -> 123."""
    return int(tid.rsplit("-", 1)[1])


def sample_tasks(num_classes: int, cfg) -> TaskPlan:
    """Sample a TaskPlan for a dataset of `num_classes` classes (`cfg`: TasksConfig)."""
    if cfg.held_out_classes >= num_classes - 1:
        raise TinaError(f"held_out_classes={cfg.held_out_classes} leaves fewer than 2 of {num_classes} classes for training")
    rng = random.Random(cfg.seed)
    classes = list(range(num_classes))
    held = sorted(rng.sample(classes, cfg.held_out_classes))
    seen = [c for c in classes if c not in set(held)]
    k_hi = min(cfg.k_max, len(seen))
    if cfg.k_min > k_hi:
        raise TinaError(f"k_min={cfg.k_min} exceeds the {len(seen)} classes available to train tasks")

    # Held-out combinations first (unseen_combo, then val). A size k may give up at most
    # max_held_out_fraction of its C(n, k) sets, so train keeps every size (e.g. the one 10-class
    # set of a 10-class dataset).
    budget = {k: math.floor(cfg.max_held_out_fraction * math.comb(len(seen), k)) for k in range(cfg.k_min, k_hi + 1)}
    sizes = [k for k, b in budget.items() if b > 0]
    wanted = cfg.unseen_combo + cfg.val
    if wanted and sum(budget.values()) < wanted:
        raise TinaError(
            f"only {sum(budget.values())} class sets can be held out for unseen_combo + val (asked {wanted}); "
            f"lower tasks.unseen_combo / tasks.val or raise tasks.max_held_out_fraction"
        )
    held_sets: set[frozenset[int]] = set()

    def draw_held_out(n: int) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        while len(out) < n:
            k = rng.choice(sizes)
            if sum(1 for s in held_sets if len(s) == k) >= budget[k]:
                sizes.remove(k)
                continue
            order = tuple(rng.sample(seen, k))
            if frozenset(order) in held_sets:
                continue
            held_sets.add(frozenset(order))
            out.append(order)
        return out

    combo = draw_held_out(cfg.unseen_combo)
    val = draw_held_out(cfg.val)  # after unseen_combo: adding a val split leaves the test tasks as they were

    # Train: any size, any set not held out. Sets may repeat (in another order, with another
    # fine-tuning run); an exact repeat of an ordered list is avoided while that is possible.
    train: list[tuple[int, ...]] = []
    used: set[tuple[int, ...]] = set()
    for _ in range(cfg.train):
        for attempt in range(1000):
            k = rng.randint(cfg.k_min, k_hi)
            order = tuple(rng.sample(seen, k))
            if frozenset(order) in held_sets:
                continue
            if order not in used or attempt > 100:
                break
        else:  # pragma: no cover - only with absurd configs
            raise TinaError("could not sample a train task outside the held-out sets; lower tasks.unseen_combo")
        used.add(order)
        train.append(order)

    # Unseen classes: j >= 1 held-out classes mixed with seen ones, in random order.
    unseen_class: list[tuple[int, ...]] = []
    for _ in range(cfg.unseen_class):
        k = rng.randint(cfg.k_min, min(cfg.k_max, num_classes))
        j = rng.randint(max(1, k - len(seen)), min(k, len(held)))
        picked = rng.sample(held, j) + rng.sample(seen, k - j)
        rng.shuffle(picked)
        unseen_class.append(tuple(picked))

    tasks, i = [], 0
    for split, lists in (("train", train), ("val", val), ("unseen_combo", combo), ("unseen_class", unseen_class)):
        for order in lists:
            tasks.append(Task(task_id(i), split, order))
            i += 1
    return TaskPlan(tasks, held)


def nearest_known(names: torch.Tensor, held_out: list[int]) -> dict[int, int]:
    """Each held-out class -> the known class whose plain-name embedding is closest (cosine): the
    "nearest known class" selection every held-out class starts from, and the baseline it is measured
    against. names: (num_classes, E) unit embeddings."""
    if not held_out:
        return {}
    held = set(int(c) for c in held_out)
    known = torch.tensor([c for c in range(names.shape[0]) if c not in held])
    sims = names.float()[sorted(held)] @ names.float()[known].T  # (H, n_known)
    return {h: int(known[j]) for h, j in zip(sorted(held), sims.argmax(1).tolist())}
