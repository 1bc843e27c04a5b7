"""A Text-to-LoRA-style hypernetwork baseline: does the diffusion earn its keep over plain regression?

A deterministic network maps the same per-class text embeddings the generator sees to the same targets
the generator learns (the normalised residual tokens from classifier selection, tina/anchor.py, built by
tina.training.data's stream with the generator's own augmentations), trained on the same zoo for the same number
of steps and batch size, by mean squared error; when the generator's own run added a task loss
(tina/training/task_loss.py), the hypernetwork adds it with the same weight over the same number of final steps
(a generator warm-started from an MSE-only one had it only for its own run's steps). At generation time one
forward pass, and the same tokens -> weights function as `tina generate` (tina.weights.tokens_to_flat).

Like the DiT it is permutation-equivariant in the classes (Deep Sets): each class is embedded alone, the
set's context is the mean over classes, a class's head tokens come from (its embedding, the context) and
the body tokens from the context alone. It is part of the evaluation, not a product: nothing ships it.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from evaluation.config import HypernetConfig

log = logging.getLogger(__name__)


def _mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, d_out))


class HyperNet(nn.Module):
    """Per-class text embeddings (N, K, E) + mask (N, K) -> normalised tokens (N, T_body + K m, C)."""

    def __init__(self, layout, cond_dim: int, width: int = 512):
        super().__init__()
        self.n_body, self.m, self.C = layout.n_body_tokens, layout.tokens_per_class, layout.token_size
        self.embed = _mlp(cond_dim, width, width)
        self.head = _mlp(2 * width, width, self.m * self.C)
        self.body = _mlp(width, width, max(self.n_body, 1) * self.C)

    def forward(self, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        N, K, _ = cond.shape
        mask = torch.ones(N, K, dtype=torch.bool, device=cond.device) if mask is None else mask
        h = self.embed(cond)  # (N, K, W)
        w = mask[..., None].to(h.dtype)
        ctx = (h * w).sum(1) / w.sum(1).clamp_min(1)  # (N, W) mean over real classes
        heads = self.head(torch.cat([h, ctx[:, None].expand_as(h)], -1))  # (N, K, m C)
        body = self.body(ctx).reshape(N, -1, self.C)[:, : self.n_body]  # (N, T_body, C)
        return torch.cat([body, heads.reshape(N, K * self.m, self.C)], 1)  # (N, T, C)


def generator_budget(bundle, cfg: HypernetConfig) -> dict:
    """Steps and batch size: the config's, else the generator's own (bundle.json training.steps, plus the
    steps of the generator it was warm-started from (training.steps_before), config.yaml)."""
    import yaml

    training = bundle.meta.get("training", {})
    steps = cfg.steps or int(training.get("steps", 0) or 0) + int(training.get("steps_before", 0) or 0)
    batch = cfg.batch_size
    if not batch and bundle.path is not None and (bundle.path / "config.yaml").is_file():
        batch = int((yaml.safe_load((bundle.path / "config.yaml").read_text()) or {}).get("trainer", {}).get("batch_size", 0) or 0)
    return {"steps": steps or 1000, "batch_size": batch or 64,
            "source": "generator" if not (cfg.steps or cfg.batch_size) else "config"}


def generator_section(bundle, name: str, schema):
    """Section `name` of the generator's config.yaml as `schema` (unknown keys dropped), else the schema's defaults."""
    import yaml

    section = {}
    if bundle.path is not None and (bundle.path / "config.yaml").is_file():
        section = (yaml.safe_load((bundle.path / "config.yaml").read_text()) or {}).get(name) or {}
    return schema(**{k: v for k, v in section.items() if k in schema.__dataclass_fields__})


def train_hypernet(bundle, zoo, cfg: HypernetConfig, device: str | torch.device = "cpu", dataset=None) -> tuple[HyperNet, dict]:
    """Train on the zoo's train shards (tina.training.data.ZooStream, the generator's pipeline); returns the net and a record.
    `dataset`: the zoo's images, for the task loss when the generator was trained with one (its train split only)."""
    from tina.training.data import AugmentConfig, ZooStream, collate, read_manifest, shard_urls
    from tina.training.task_loss import TaskLoss, TaskLossConfig
    from tina.schedule import warmup_cosine

    budget = generator_budget(bundle, cfg)
    task_cfg = generator_section(bundle, "task_loss", TaskLossConfig)
    task_loss = None
    if task_cfg.weight > 0:
        if dataset is None:
            raise ValueError("the generator was trained with a task loss: the hypernet baseline needs the dataset for it")
        task_loss = TaskLoss(task_cfg, bundle.layout, bundle.target, dataset, bundle.anchor, bundle.base)
    # The generator's own run (training.steps) is the part of its budget that had the task loss.
    task_steps = min(budget["steps"], int(bundle.meta.get("training", {}).get("steps", 0) or budget["steps"])) if task_loss else 0
    torch.manual_seed(cfg.seed)
    layout = bundle.layout
    net = HyperNet(layout, bundle.vocab_emb.shape[1], cfg.width).to(device)
    stream = ZooStream(shard_urls(zoo, read_manifest(zoo), "train"), layout, generator_section(bundle, "augment", AugmentConfig),
                       cfg.seed, anchor=bundle.anchor)
    loader = torch.utils.data.DataLoader(stream, batch_size=budget["batch_size"], num_workers=cfg.workers,
                                         collate_fn=functools.partial(collate, layout=layout))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0, losses = time.perf_counter(), []
    net.train()
    bar = tqdm(total=budget["steps"], desc="hypernet baseline", unit="step", leave=False)
    for step, batch in zip(range(budget["steps"]), loader):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, budget["steps"], cfg.warmup_steps, floor=0.05)
        pred = net(batch["cond"].to(device), batch["cond_mask"].to(device))  # (N, T, C)
        w = batch["elem_mask"].to(device, pred.dtype)
        loss = ((pred - batch["x0"].to(device)) ** 2 * w).sum() / w.sum().clamp_min(1)
        if task_loss is not None and step >= budget["steps"] - task_steps:  # one-pass predictions: score the first task_cfg.tasks
            rows = torch.arange(min(task_cfg.tasks, pred.shape[0]))
            loss = loss + task_cfg.weight * task_loss(pred, batch["cond"], batch["cond_mask"], batch["class_ids"], rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update()
    bar.close()
    net.eval()
    record = {**budget, "task_loss_weight": task_cfg.weight, "task_loss_steps": task_steps, "lr": cfg.lr, "width": cfg.width,
              "parameters": sum(p.numel() for p in net.parameters()),
              "final_loss": float(sum(losses[-50:]) / max(1, len(losses[-50:]))), "seconds": round(time.perf_counter() - t0, 1)}
    log.info("hypernet baseline: %d steps x %d models, loss %.4f, %.0f s", budget["steps"], budget["batch_size"],
             record["final_loss"], record["seconds"])
    return net, record


@torch.no_grad()
def hypernet_flat(net: HyperNet, bundle, cond: torch.Tensor) -> torch.Tensor:
    """One forward pass: per-class conditions (k, E) -> flat weights (P,) in task order."""
    from tina.weights import tokens_to_flat

    device = next(net.parameters()).device
    tokens = net(cond.float()[None].to(device))[0]  # (T, C)
    return tokens_to_flat(bundle.layout, tokens, cond, bundle.anchor)
