"""Lightning wiring for the generator: optimisation, EMA, validation by real accuracy. No math here
beyond what Lightning needs; the loss and sampler live in tina/diffusion.py.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from tina.config import at_least
from tina.diffusion import DiffusionConfig, initial_noise, make_scheduler, sample_tokens, scheduler_config, training_loss
from tina.layout import ParamLayout
from tina.model import DiT
from tina.schedule import warmup_cosine
from tina.training.accuracy import accuracy, gain_captured, task_test_set
from tina.training.task_loss import TaskLoss
from tina.weights import assemble, tokens_to_flat

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay; EMA of the weights for sampling."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at max_steps
    ema_decay: float = 0.999

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0 and 0 <= self.ema_decay < 1 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"optim needs lr > 0, 0 <= ema_decay < 1 and 0 <= min_lr_ratio <= 1, got {self}")
        at_least("optim", warmup_steps=(self.warmup_steps, 0), weight_decay=(self.weight_decay, 0))


@dataclass
class ValConfig:
    """Validation samples models for held-out tasks and measures them on real test images."""

    tasks: int = 24  # held-out tasks sampled per validation (with the diffusion config's sampler)
    # auto: the zoo's "val" split when it has one, else unseen_combo (then the settings a run is
    # tuned on come from the test split: build zoos with tasks.val > 0)
    split: str = "auto"
    images_per_class: int = 200

    def __post_init__(self):
        at_least("val", tasks=(self.tasks, 1), images_per_class=(self.images_per_class, 1))


class TinaLitModule(L.LightningModule):
    """Trains a DiT on zoo examples; keeps an EMA copy used for validation and export."""

    def __init__(self, dit: DiT, layout: ParamLayout, diffusion: DiffusionConfig, optim: OptimConfig, max_steps: int,
                 val: ValConfig | None = None, val_models: list[dict] | None = None, dataset=None, target: str | None = None,
                 anchor=None, seed: int = 0, class_emb: torch.Tensor | None = None, base: dict | None = None,
                 task_loss: TaskLoss | None = None):
        super().__init__()
        self.seed = seed
        self.dit = dit
        self.ema = copy.deepcopy(dit).requires_grad_(False)
        self.layout, self.diffusion, self.optim_cfg, self.max_steps = layout, diffusion, optim, max_steps
        self.sched_config = scheduler_config(diffusion)
        self.scheduler = make_scheduler(self.sched_config, "ddpm")
        self.val_cfg, self.val_models, self.dataset, self.target = val, val_models or [], dataset, target
        self.anchor = anchor  # tina.anchor.SelectionAnchor when the DiT generates residuals
        self.class_emb = class_emb  # (V, E) plain-name embeddings by dataset class id: what `tina generate` conditions on
        self.base = base or {}  # frozen backbone weights and buffers (head-on-backbone targets)
        self.task_loss = task_loss  # cross-entropy of the generated classifiers on train images (tina/training/task_loss.py)

    def on_train_batch_start(self, batch, batch_idx):
        # This step's timesteps, noise and condition dropout are drawn from (seed, rank, step), not from
        # the RNG's history: a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
        state = np.random.SeedSequence([self.seed, self.global_rank, self.global_step]).generate_state(2)
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))

    def training_step(self, batch, batch_idx):
        N = batch["x0"].shape[0]
        out = training_loss(self.dit, self.scheduler, batch["x0"], batch["elem_mask"], batch["cond"], batch["cond_mask"],
                            self.diffusion.cond_dropout, self.diffusion.high_noise_fraction)
        loss = out.loss
        if self.task_loss is not None:
            ce = self.task_loss(out.pred, batch["cond"], batch["cond_mask"], batch["class_ids"], self.task_loss.chosen(out.t, out.uncond))
            self.log("train/task_ce", ce, prog_bar=True, batch_size=N)
            self.log("train/mse", out.loss, batch_size=N)
            loss = loss + self.task_loss.cfg.weight * ce
        self.log("train/loss", loss, prog_bar=True, batch_size=N)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: Lightning saves step checkpoints before the module's
        # on_train_batch_end runs, so an EMA updated there would be one step behind in the checkpoint.
        self._update_ema()

    def _update_ema(self):
        # Warm the EMA up (as in many diffusion codebases) so early validations are meaningful.
        step = self.global_step
        decay = min(self.optim_cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.dit.parameters()):
                e.lerp_(p.detach().to(e.dtype), 1 - decay)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.dit.named_parameters():
            (no_decay if p.ndim < 2 or n.endswith("_pos") or n == "null_cond" else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim_cfg.lr, betas=(0.9, 0.99),
        )
        warm, total, floor = self.optim_cfg.warmup_steps, max(self.max_steps, 1), self.optim_cfg.min_lr_ratio

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warm, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation: real accuracy of generated models ------------------------------------------

    def validation_step(self, batch, batch_idx):
        return None  # everything happens once per validation, in on_validation_epoch_end

    @torch.no_grad()
    def on_validation_epoch_end(self):
        # Rank zero only: every rank would generate the same models; the others go on to the next
        # step's gradient all-reduce and wait there.
        if not self.val_models or self.dataset is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        metrics = validate_generated(self.ema, self.layout, self.sched_config, self.val_models, self.dataset, self.target,
                                     self.val_cfg, self.diffusion, base=self.base, anchor=self.anchor, class_emb=self.class_emb)
        metrics = {k: v for k, v in metrics.items() if v is not None}  # an undefined gain captured is not logged
        for k, v in metrics.items():
            self.log(f"val/{k}", v, rank_zero_only=True, sync_dist=False)
        log.info("step %d: %s", self.global_step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


@torch.no_grad()
def validate_generated(dit, layout, sched_config, models: list[dict], dataset, target: str, cfg: ValConfig,
                       diffusion: DiffusionConfig, base=None, anchor=None, class_emb: torch.Tensor | None = None) -> dict:
    """Generate the given zoo tasks from their class names; mean accuracy vs oracle and selection.

    The generated models are exactly what `Tina.generate_tasks` returns for these class names (same
    conditions, noise and tokens -> weights function, tina/weights.py), so validation scores what a
    user gets. `class_emb` (V, E): the plain-name embeddings the bundle will carry, by dataset class id
    (None: the zoo models' own, which are the same names stored in float16).
    Generated, oracle (the zoo model) and selection are measured on the same test images, so the
    gain captured is a paired comparison. `anchor`: the SelectionAnchor the DiT's residuals are added
    to (None: the DiT generates whole weights, and selection is the zoo's recorded accuracy)."""
    dit.eval()
    device = next(dit.parameters()).device
    K = max(len(m["classes"]) for m in models)
    E = models[0]["emb"].shape[-1]
    cond = torch.zeros(len(models), K, E)
    mask = torch.zeros(len(models), K, dtype=torch.bool)
    for i, m in enumerate(models):
        k = len(m["classes"])
        emb = class_emb[m["class_ids"]] if class_emb is not None else m["emb"][:, 0]  # (k, E) plain class names
        cond[i, :k] = emb.float()
        mask[i, :k] = True
    noise = initial_noise(0, [dit.num_tokens(len(m["classes"])) for m in models], layout.token_size)  # as Tina.generate_tasks(seed=0)
    tokens = sample_tokens(dit, sched_config, cond.to(device), None if bool(mask.all()) else mask.to(device),
                           sampler=diffusion.sampler, steps=diffusion.steps, guidance=diffusion.guidance,
                           noise=noise.to(device)).float().cpu()
    gen_acc, oracle, select = [], [], []
    for i, m in enumerate(models):
        k = len(m["classes"])
        x, y = task_test_set(dataset, m["class_ids"], cfg.images_per_class)
        try:
            net = assemble(target, dataset.image, layout, tokens_to_flat(layout, tokens[i], cond[i, :k], anchor), m["classes"], base)
            gen_acc.append(accuracy(net, x, y))
        except Exception:  # noqa: BLE001 - NaN weights early in training count as chance
            gen_acc.append(1.0 / k)
        oracle.append(accuracy(assemble(target, dataset.image, layout, m["params"], m["classes"], base), x, y))
        if anchor is not None:
            select.append(accuracy(assemble(target, dataset.image, layout, anchor.origin(m["class_ids"]), m["classes"], base), x, y))
        else:
            select.append(m["metrics"]["selection_acc"])
    g, o, s = (float(np.mean(v)) for v in (gen_acc, oracle, select))
    return {"gen_acc": g, "oracle_acc": o, "selection_acc": s, "ratio_to_oracle": g / o,
            "gain_captured": gain_captured(g, o, s)}  # None when oracle - selection < MIN_ORACLE_GAIN


