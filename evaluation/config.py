"""Configuration of `tina eval`: the prompt forms, baselines and splits it knows, and the typed EvalConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


RESULTS_FORMAT = "tina-eval/1"
SPLITS = ("train", "val", "unseen_combo", "unseen_class")
SPLIT_TITLES = {"train": "seen combos", "val": "val combos", "unseen_combo": "unseen combos", "unseen_class": "unseen classes"}
FORMS = ("names", "template", "description", "heldout_template", "paraphrase", "shuffled", "random_text",
         "unrelated_words", "mismatched")
HURTING_FORMS = ("random_text", "unrelated_words", "mismatched")  # the proof that text steers the weights
# oracle: the zoo's fine-tuned model; selection: the generic model's rows; retrieval: the nearest training
# model by text (whole zoo); compose_zoo_body / compose_generic_body: each class's head row averaged over the
# training models that contain it, on the zoo's mean body / the generic body; hypernet: a deterministic
# text -> weights network (evaluation/hypernet.py); zeroshot: images -> text space -> nearest class name
# (checkpoints with an image projector). See evaluation/baselines.py.
BASELINES = ("oracle", "selection", "retrieval", "compose_zoo_body", "compose_generic_body", "hypernet", "zeroshot")
# Headline differences with paired bootstrap intervals: (a, b) means a - b; "generated" is the names prompt.
DIFFERENCES = (("generated", "retrieval"), ("generated", "selection"), ("generated", "hypernet"),
               ("generated", "compose_zoo_body"), ("generated", "compose_generic_body"), ("oracle", "generated"))
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
class HypernetConfig:
    """The text -> weights hypernetwork baseline (Text-to-LoRA style): same zoo, same budget as the generator."""

    steps: int = 0  # training steps; 0: the generator's own (its bundle's training.steps)
    batch_size: int = 0  # models per step; 0: the generator's own (its config's trainer.batch_size)
    lr: float = 1e-3
    warmup_steps: int = 100
    width: int = 512
    seed: int = 0
    # DataLoader worker processes reading and tokenizing the zoo (0: in the main process). On a CPU the
    # pipeline takes about half of a step, so one worker overlaps it with the network's forward/backward.
    workers: int = 1

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 0 or self.width < 1 or self.workers < 0:
            raise ValueError("hypernet.steps, hypernet.batch_size and hypernet.workers must be >= 0, hypernet.width >= 1")


@dataclass
class NoveltyConfig:
    """Memorization: each generated model's nearest training model in weight space (head rows aligned)."""

    tasks: int = 50  # tasks per split measured (0 = skip)
    pairs: int = 30  # reference pairs of training runs of the same class set
    copy_factor: float = 0.5  # a copy / an average is closer than copy_factor x the same-set run distance


@dataclass
class DiversityConfig:
    """Multi-step sampling: single samples, their disagreement, and ensembles vs the one-step mean model."""

    tasks: int = 20  # tasks of `split` (0 = skip)
    split: str = "unseen_combo"  # falls back to the first evaluated split
    samples: int = 5  # samples (seeds) per task and step count
    steps: list[int] = field(default_factory=lambda: [5, 25, 50])  # DDIM steps compared with 1 (the mean)


@dataclass
class ExpectConfig:
    """What the zoo and checkpoint must be (a paper setting); unset fields accept anything."""

    dataset: Optional[str] = None  # a tina.training.datasets name
    target: Optional[str] = None  # e.g. cnn-5k
    text_encoder: Optional[str] = None  # e.g. open_clip:ViT-B-32/openai
    k: Optional[int] = None  # every evaluated task has exactly k classes
    min_tasks: int = 0  # the full setting's task count; fewer runs anyway, with a "reduced run" note in the results
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
    strength: Optional[float] = None  # multi-step samples start from the mean noised to this (default: the checkpoint's)
    images_per_class: int = 100  # test images per class (the first ones; 0 = all)
    forms: list[str] = field(default_factory=lambda: list(FORMS))  # prompt forms (see FORMS)
    image_shots: list[int] = field(default_factory=lambda: [1, 5])  # image prompts: train images per class
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    batch_size: int = 256  # tasks per generate_tasks call
    eval_batch: int = 4096  # images per forward pass when scoring
    plots: bool = True
    bootstrap: int = 2000  # paired bootstrap resamples of the tasks for the 95% intervals
    finetune: FinetuneBudgetConfig = field(default_factory=FinetuneBudgetConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    novelty: NoveltyConfig = field(default_factory=NoveltyConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
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
        from tina.validate import check_sampling

        check_sampling(steps=self.steps, guidance=self.guidance, strength=self.strength)  # NaN guidance would score as chance


def load_eval_config(path: str | None = None, overrides: list[str] | tuple = ()) -> EvalConfig:
    from tina.config import load_config

    return load_config(EvalConfig, path, overrides)


