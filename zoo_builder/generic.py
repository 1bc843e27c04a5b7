"""The generic model: one target net trained on every class, the starting point of each personalized model.

Saved as ZOO/generic.safetensors (a TargetNet state dict, strict-loadable, with any frozen backbone and
its BatchNorm statistics) and ZOO/generic.json (test accuracy and the hash of the settings it was
trained with). A resumed build reuses it when that hash matches.

Whole-network targets (cnn-5k) train end to end with plain minibatch training. Head-on-backbone
targets (resnet20+linear, <timm>+linear) train the same way, backbone included, when no weights are
given (offline there are no pretrained ones): the backbone is trained once, here, then frozen for
every personalized head. With `generic.pretrained=true` or `generic.checkpoint=FILE` the given
backbone stays as it is and only the head trains, on features computed once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tina.config import config_hash
from tina.targets import TargetNet, get_target

log = logging.getLogger(__name__)

GENERIC_WEIGHTS, GENERIC_METRICS = "generic.safetensors", "generic.json"


def generic_identity(cfg, layout_fingerprint: str, held_out: list[int] = ()) -> str:
    """Hash of what the generic model depends on (`cfg`: ZooConfig); the layout fingerprint changes
    with the target's architecture, so weights of an older architecture are never reused."""
    d = {"dataset": cfg.dataset.identity(), "target": cfg.target, "generic": vars(cfg.generic), "layout": layout_fingerprint}
    if held_out:  # only when present, so zoos without held-out classes keep their hashes
        d["held_out_classes"] = sorted(int(c) for c in held_out)
    return config_hash(d)


def known_only(dataset, held_out: list[int]):
    """The dataset without the images of strictly held-out classes (labels unchanged): the generic
    model must never see them, or selection for them would not be zero-shot."""
    if not held_out:
        return dataset
    held = np.asarray(sorted(held_out))
    keep_tr, keep_te = ~np.isin(dataset.train_y, held), ~np.isin(dataset.test_y, held)
    return replace(dataset, train_x=dataset.train_x[keep_tr], train_y=dataset.train_y[keep_tr],
                   test_x=dataset.test_x[keep_te], test_y=dataset.test_y[keep_te])  # fmt: skip


def build_net(cfg, image, num_classes: int) -> TargetNet:
    spec = get_target(cfg.target)
    return spec.build(num_classes, image, pretrained=cfg.generic.pretrained, checkpoint=cfg.generic.checkpoint)


@torch.no_grad()
def extract_features(net: TargetNet, images, batch_size: int = 256, desc: str = "features",
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy images -> body features (N, D) of a TargetNet in eval mode. With `rows`,
    only those images go through the network (the others' features stay zero): a build that fine-tunes on
    500 images of a 60,000-image training set pays for 500 backbone passes."""
    net.eval()
    idx = torch.arange(len(images)) if rows is None else rows.unique()
    out = torch.zeros(len(images), net.head.in_features)
    for lo in tqdm(range(0, len(idx), batch_size), desc=desc, leave=False, disable=len(idx) <= batch_size):
        sel = idx[lo : lo + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(images[sel.numpy()])).permute(0, 3, 1, 2).float().div_(255.0)
        out[sel] = net.features(x.contiguous(memory_format=torch.channels_last))
    return out


def _train_cnn(net: TargetNet, dataset, gcfg, gen: torch.Generator) -> None:
    """Plain minibatch Adam on all training images, every parameter (channels-last: faster convolutions on CPU)."""
    net.train()
    net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=gcfg.lr)
    pool = _training_pool(torch.from_numpy(dataset.train_y), gcfg.images_per_class, gen)
    n = len(pool)
    steps = gcfg.epochs * ((n + gcfg.batch_size - 1) // gcfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    bar = tqdm(total=steps, desc="generic model", unit="step", leave=False)
    for _ in range(gcfg.epochs):
        perm = pool[torch.randperm(n, generator=gen)]
        for lo in range(0, n, gcfg.batch_size):
            x, y = dataset.tensors("train", perm[lo : lo + gcfg.batch_size])
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    net.eval()


def _training_pool(labels: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the training images used: all, or the first `per_class` of each class in a seeded shuffle."""
    if not per_class:
        return torch.arange(len(labels))
    perm = torch.randperm(len(labels), generator=gen)
    keep = torch.cat([perm[labels[perm] == c][:per_class] for c in labels.unique()])
    return keep.sort().values


def _train_head(net: TargetNet, feats: torch.Tensor, labels: torch.Tensor, gcfg, gen: torch.Generator) -> None:
    """Only the linear head, on precomputed features of the frozen backbone."""
    opt = torch.optim.Adam(net.head.parameters(), lr=gcfg.lr)
    pool = _training_pool(labels, gcfg.images_per_class, gen)
    for _ in range(gcfg.epochs):
        perm = pool[torch.randperm(len(pool), generator=gen)]
        for lo in range(0, len(perm), gcfg.batch_size):
            idx = perm[lo : lo + gcfg.batch_size]
            loss = F.cross_entropy(net.head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(net: TargetNet, dataset, batch_size: int = 512) -> float:
    net.eval()
    correct = 0
    for lo in range(0, len(dataset.test_y), batch_size):
        x, y = dataset.tensors("test", slice(lo, lo + batch_size))
        correct += (net(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
    return correct / max(1, len(dataset.test_y))


def frozen_features(net: TargetNet, dataset) -> dict[str, torch.Tensor]:
    """The frozen backbone's features of every train and test image, (N, D) each: computed once per build."""
    return {"train": extract_features(net, dataset.train_x, desc="train features"),
            "test": extract_features(net, dataset.test_x, desc="test features")}  # fmt: skip


def trains_backbone(cfg) -> bool:
    """Whether the generic model's training includes the backbone of a head-on-backbone target."""
    return not (cfg.generic.pretrained or cfg.generic.checkpoint)


def train_generic(cfg, dataset, layout_fingerprint: str, held_out: list[int] = ()) -> tuple[TargetNet, dict, dict | None]:
    """Train the generic model of `cfg` (ZooConfig) on `dataset` minus the `held_out` classes (their
    head rows stay at their random init and are never used); returns the net, its metrics (test
    accuracy over the known classes' test images) and, when only a given backbone's head trained, that
    backbone's features of every image (reused by the build; otherwise None).
    """
    gen = torch.Generator().manual_seed(cfg.generic.seed)
    torch.manual_seed(cfg.generic.seed)  # the net's initialisation
    net = build_net(cfg, dataset.image, len(dataset.classes))
    head_only = get_target(cfg.target).head_only
    t0 = time.perf_counter()
    features = None
    if not head_only or trains_backbone(cfg):
        known = known_only(dataset, held_out)
        _train_cnn(net, known, cfg.generic, gen)
        test_acc = accuracy(net, known)
    else:
        features = frozen_features(net, dataset)
        held = torch.as_tensor(sorted(held_out), dtype=torch.long)
        train_y, test_y = torch.from_numpy(dataset.train_y), torch.from_numpy(dataset.test_y)
        tr, te = ~torch.isin(train_y, held), ~torch.isin(test_y, held)
        _train_head(net, features["train"][tr], train_y[tr], cfg.generic, gen)
        with torch.no_grad():
            test_acc = (net.head(features["test"][te]).argmax(1) == test_y[te]).float().mean().item()
    metrics = {"test_acc": round(test_acc, 5), "seconds": round(time.perf_counter() - t0, 1),
               "num_classes": len(dataset.classes), "held_out_classes": sorted(int(c) for c in held_out),
               "identity": generic_identity(cfg, layout_fingerprint, held_out)}  # fmt: skip
    net.to(memory_format=torch.contiguous_format)
    log.info("generic model: test accuracy %.4f in %.0f s", test_acc, metrics["seconds"])
    return net, metrics, features


def save_generic(zoo: Path, net: TargetNet, metrics: dict) -> None:
    """Weights first, metrics last (atomically): generic.json present means the weights are complete."""
    tmp = zoo / (GENERIC_WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors writes 0600; the zoo is read by other users and tools
    os.replace(tmp, zoo / GENERIC_WEIGHTS)
    tmp = zoo / (GENERIC_METRICS + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, zoo / GENERIC_METRICS)


def load_generic(zoo: Path, cfg, layout_fingerprint: str, held_out: list[int] = ()) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The saved generic model if it was trained with the same settings, architecture and held-out classes, else None."""
    mpath, wpath = zoo / GENERIC_METRICS, zoo / GENERIC_WEIGHTS
    if not (mpath.is_file() and wpath.is_file()):
        return None
    metrics = json.loads(mpath.read_text())
    if metrics.get("identity") != generic_identity(cfg, layout_fingerprint, held_out):
        log.warning("ignoring %s: trained with other settings", wpath)
        return None
    return load_file(str(wpath)), metrics
