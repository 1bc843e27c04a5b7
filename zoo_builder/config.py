"""Typed zoo-build configs: `configs/zoo/*.yaml` merged onto these dataclasses by tina.config.load_config.

The sections follow the data flow: dataset -> tasks -> generic model -> fine-tuning -> shards.
Everything except `out` and `runtime` is part of the zoo's identity: a killed build may only be resumed with
the same values (checked against ZOO/plan.json), while `runtime` (threads, workers) may change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from tina.config import config_hash, to_dict
from tina.training.datasets import DatasetConfig  # noqa: F401 - the `dataset:` section, shared with training and evaluation


@dataclass
class TasksConfig:
    """How tasks (ordered lists of distinct class ids) are sampled; see zoo_builder/tasks.py."""

    train: int = 1800  # tasks the generator trains on
    val: int = 0  # held-out class sets for validation while training (disjoint from unseen_combo)
    unseen_combo: int = 200  # held-out tasks whose class SET never occurs in train
    unseen_class: int = 0  # held-out tasks with at least one held-out class
    held_out_classes: int = 0  # classes that occur in no train / unseen_combo task
    k_min: int = 2
    k_max: int = 10
    max_held_out_fraction: float = 0.5  # at most this share of the class sets of one size may be held out
    seed: int = 0

    def __post_init__(self):
        if self.k_min < 2 or self.k_max < self.k_min:
            raise ValueError(f"tasks need 2 <= k_min <= k_max, got k_min={self.k_min} k_max={self.k_max}")
        if min(self.train, self.val, self.unseen_combo, self.unseen_class, self.held_out_classes) < 0:
            raise ValueError("task counts and held_out_classes must be >= 0")
        if self.unseen_class and not self.held_out_classes:
            raise ValueError("unseen_class tasks need held_out_classes > 0")
        if not 0.0 < self.max_held_out_fraction < 1.0:
            raise ValueError("max_held_out_fraction must be in (0, 1)")


@dataclass
class GenericConfig:
    """The generic model: one target net trained on all classes (the init of every personalized model)."""

    epochs: int = 3
    images_per_class: int = 0  # training images per class (0 = all); small values make quick test zoos
    batch_size: int = 128
    lr: float = 2e-3  # Adam peak learning rate (cosine decay to 0 over all steps)
    seed: int = 0
    pretrained: bool = False  # timm targets: load pretrained backbone weights (must be available offline)
    checkpoint: Optional[str] = None  # timm targets: a local backbone checkpoint file


@dataclass
class FinetuneConfig:
    """Personalized models: fine-tuned from classifier selection, many at once (zoo_builder/fit.py)."""

    steps: int = 100
    batch_size: int = 32  # per model and step
    # How a minibatch's classes are drawn (zoo_builder/fit.py sample_batch): "balanced" (uniform over the
    # task's classes) or "proportional" (as often as the training set has them: keeps an imbalanced
    # dataset's class priors, which the generic model learned and the test set shares).
    sampling: str = "balanced"
    lr: float = 2e-3  # Adam peak learning rate (linear warmup, cosine decay to 0)
    warmup_steps: int = 10
    head_lr_mult: float = 1.0  # the head's learning rate relative to the body's
    train_per_class: int = 0  # training images per class a task may use (0 = all)
    eval_per_class: int = 300  # fixed test images per class for oracle / selection accuracy
    eval_chunk: int = 128  # evaluation images per model per forward pass
    # Arithmetic of the convolutions in training: "bf16" runs them in bfloat16 (float32 master weights,
    # head, loss and Adam), ~1.3x (cnn-5k) to ~1.8x (cnn-33k) faster on CPUs with AVX512-BF16 and on GPUs;
    # "fp32" is exact. The generic trainer's vmap fallback (zoo_builder/stack.py) is float32 only.
    # Oracle and selection accuracy are always measured in float32.
    precision: str = "fp32"
    seed: int = 0

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.precision]

    def __post_init__(self):
        if self.sampling not in ("balanced", "proportional"):
            raise ValueError(f"finetune.sampling must be balanced or proportional, got {self.sampling!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"finetune.precision must be fp32 or bf16, got {self.precision!r}")
        if self.steps < 0 or self.batch_size < 1 or self.eval_per_class < 1:
            raise ValueError("finetune: steps >= 0, batch_size and eval_per_class >= 1")


@dataclass
class RuntimeConfig:
    """How the build uses this machine; not part of the zoo's identity: every model's minibatches
    come from its own counter-based random stream (zoo_builder/fit.py), so grouping and device
    change the speed, not the models (beyond float rounding across devices)."""

    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    group_size: int = 0  # models trained together in one stacked computation (0: 24 on CPU, 2048 on GPU)
    images_per_call: int = 0  # models x images per forward/backward call (0: 384 on CPU, the whole group on GPU)
    workers: int = 0  # groups fitted in parallel threads (0: one per CPU core; 1 on GPU)
    threads: int = 0  # torch threads (0 = os.cpu_count())

    def __post_init__(self):
        if min(self.group_size, self.images_per_call, self.workers, self.threads) < 0:
            raise ValueError("runtime: group_size, images_per_call, workers and threads must be >= 0")

    def resolved_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from tina.errors import TinaError

            raise TinaError(f"runtime.device={self.device} but CUDA is not available here; use runtime.device=cpu")
        return dev

    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def resolved_workers(self, device) -> int:
        # A GPU runs one group at a time: a group of thousands of models already fills it.
        return self.workers or (1 if device.type == "cuda" else os.cpu_count() or 1)

    def resolved_group_size(self, device) -> int:
        return self.group_size or (2048 if device.type == "cuda" else 24)

    def models_per_call(self, device, batch_size: int) -> int:
        """0 = the whole group. CPU: a few hundred images per call keep the temporaries in cache (12 models
        of batch 32: 5-15% faster than 4 or 24 per call; a whole 24-model group streams through memory)."""
        images = self.images_per_call or (0 if device.type == "cuda" else 384)
        return max(1, images // batch_size) if images else 0


@dataclass
class ZooConfig:
    """A zoo build: `python -m zoo_builder build CONFIG key=value ...`."""

    out: str = "zoos/fashion_mnist"  # the zoo folder
    target: str = "cnn-5k"  # a tina.targets name
    token_size: int = 128  # C of the ParamLayout written into the manifest
    text_encoder: str = "minilm"  # a tina.text encoder name
    shard_size: int = 250  # models per webdataset shard
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.token_size < 1:
            raise ValueError(f"token_size must be >= 1, got {self.token_size}")


def identity(cfg: ZooConfig) -> dict:
    """The values that determine the zoo's content (everything but where it goes and `runtime`)."""
    d = to_dict(cfg)
    d.pop("runtime")
    d.pop("out")
    d["dataset"] = cfg.dataset.identity()
    return d


def identity_hash(cfg: ZooConfig) -> str:
    return config_hash(identity(cfg))
