"""Task loss: the cross-entropy of the model a prompt generates, on training images of its classes.

Diffusion training alone regresses the zoo's weights; at the noisiest timesteps its x0 prediction is
the conditional mean E[weights | classes] that one-step sampling returns. That mean tops out near the
zoo's own models (on Fashion-MNIST the generator, full-zoo retrieval and a text->weights hypernetwork
all stop at ~0.920 on unseen combinations). The task loss adds a functional signal: the predicted x0 is
turned into the classifier a user would get (tina/weights.py, the one tokens -> weights path, soft
selection origin included) and scored by cross-entropy on a few *train* images of the task's classes.
Generation stays data-free; only training sees images, as the zoo builder did.

By default it applies where the x0 prediction is what one-step sampling returns: conditioned (not
dropped) examples at the noisiest 5% of timesteps (`min_t` 0.95). Lower timesteps keep the plain
diffusion loss, so multi-step samples still follow the zoo's spread; `min_t` 0 scores them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tina.config import at_least
from tina.diffusion import high_noise_start
from tina.layout import ParamLayout
from tina.targets import get_target
from tina.weights import tokens_to_flat


@dataclass
class TaskLossConfig:
    """Cross-entropy of generated classifiers on training images, added to the diffusion loss."""

    weight: float = 0.0  # 0: off (pure diffusion training, as in the paper)
    tasks: int = 16  # batch examples scored per step (conditioned, t >= min_t x T); the rest keep the MSE alone
    images_per_class: int = 8  # random train images of each class per scored task
    # Rows at timesteps >= min_t x T are scored. 0.95: only where the x0 prediction is the one-step mean
    # (training_loss's high-noise band); 0: every timestep, so multi-step samples are scored too.
    min_t: float = 0.95

    def __post_init__(self):
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"task_loss.weight must be a finite number >= 0, got {self.weight}")
        if not 0 <= self.min_t <= 1:
            raise ValueError(f"task_loss.min_t must be in [0, 1], got {self.min_t}")
        at_least("task_loss", tasks=(self.tasks, 1), images_per_class=(self.images_per_class, 1))


class TaskLoss:
    """Scores predicted x0 tokens by the cross-entropy of the classifiers they make.

    `dataset` supplies the train images (never the test split); `base` the frozen weights of a
    head-on-backbone target; `anchor` the selection origin the DiT's residuals are added to."""

    def __init__(self, cfg: TaskLossConfig, layout: ParamLayout, target: str, dataset, anchor=None, base: dict | None = None,
                 num_train_timesteps: int = 1000):
        self.cfg, self.layout, self.target, self.dataset, self.anchor = cfg, layout, get_target(target), dataset, anchor
        self.base = base or {}
        self.t_min = high_noise_start(num_train_timesteps, 1 - cfg.min_t)  # min_t 0.95: training_loss's high-noise band
        self.by_class = {int(c): torch.from_numpy(np.flatnonzero(dataset.train_y == c)) for c in np.unique(dataset.train_y)}
        self._nets: dict[int, torch.nn.Module] = {}

    def _net(self, k: int) -> torch.nn.Module:
        if k not in self._nets:
            self._nets[k] = self.target.build(k, self.dataset.image).eval()  # a template; weights come from functional_call
        return self._nets[k]

    def chosen(self, t: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Indices of the batch examples scored: conditioned, at t >= min_t x T, the first cfg.tasks."""
        return torch.nonzero((t >= self.t_min) & ~uncond).flatten()[: self.cfg.tasks]

    def images(self, class_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Random train images (n, C, H, W) of the classes, labels = task positions (n,). Drawn from torch's
        RNG, which the LightningModule seeds per step (so a resumed run draws what the uninterrupted one drew)."""
        n = self.cfg.images_per_class
        idx = [self.by_class[c][torch.randint(len(self.by_class[c]), (n,))] for c in class_ids]
        x, _ = self.dataset.tensors("train", torch.cat(idx))
        return x, torch.arange(len(class_ids)).repeat_interleave(n)

    def __call__(self, pred: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None, class_ids: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch rows `rows`. pred (N, T, C) normalised x0 tokens; cond (N, K, E);
        cond_mask (N, K) or None (all real); class_ids (N, K) dataset ids in task order, -1 on padding."""
        losses = []
        for i in rows.tolist():
            k = int(cond_mask[i].sum()) if cond_mask is not None else cond.shape[1]
            flat = tokens_to_flat(self.layout, pred[i], cond[i, :k], self.anchor)  # (P,), differentiable
            x, y = self.images(class_ids[i, :k].tolist())
            logits = functional_call(self._net(k), self.layout.unflatten(flat, k) | self.base, (x,))  # (n, k)
            losses.append(F.cross_entropy(logits, y))
        return torch.stack(losses).mean() if losses else pred.sum() * 0.0
