"""Build a zoo: `python -m zoo_builder build CONFIG key=value ...` (also `tina zoo build`).

Steps, each resumable:
  1. prepare (rank 0): sample tasks, train or reuse the generic model, encode the vocabulary,
     write plan.json; other ranks wait for plan.json;
  2. shards: shard i is built by rank i % world_size; finished shards are skipped, so a killed
     build resumes where it stopped and, with per-model random streams, rebuilds exactly what was lost;
  3. finalize: whichever rank finds every shard present writes manifest.json (atomically).
Ranks come from --rank/--world-size or the RANK/WORLD_SIZE variables torchrun sets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tina.config import config_hash, config_help, load_config, save_config
from tina.errors import TinaError
from tina.layout import ParamLayout, layout_for
from tina.validate import ArgumentParser, writable_folder
from tina.targets import get_target
from zoo_builder import fit, generic
from zoo_builder.stack import FuncStack
from zoo_builder.config import ZooConfig, identity, identity_hash
from zoo_builder.shards import (
    MANIFEST, PLAN, VOCAB, build_manifest, encode_sample, load_vocab, plan_shards, read_json, remove_stale_tmp,
    write_json, write_shard, write_vocab,
)  # fmt: skip
from zoo_builder.tasks import TaskPlan, nearest_known, sample_tasks, task_number

log = logging.getLogger(__name__)
WAIT_SECONDS = 6 * 3600  # how long a rank > 0 waits for rank 0 to prepare


def _fit_net(cfg: ZooConfig, image, layout: ParamLayout, state: dict[str, torch.Tensor]):
    """The batched trainer of a target: the generic one (zoo_builder/stack.py) for every target but cnn-5k,
    which keeps its hand-written fast path (fit.StackedCNN5k; benchmarks/zoo_throughput.py)."""
    if cfg.target == "cnn-5k":
        return fit.StackedCNN5k(image.channels, image.size, cfg.finetune.dtype)
    return FuncStack(cfg.target, image, layout.feature_dim, frozen={n: state[n] for n in layout.frozen}, dtype=cfg.finetune.dtype)


def prepare(cfg: ZooConfig, zoo: Path, dataset) -> tuple[dict, dict | None]:
    """Rank 0's one-time work; returns the plan (the manifest minus shards and counts) and, when only the
    head of a given (pretrained) backbone trained here, that backbone's features of every image (reused)."""
    from tina.prompts import NUM_VARIANTS, class_variants
    from tina.text import get_text_encoder

    layout = layout_for(cfg.target, dataset.image, cfg.token_size)
    plan = sample_tasks(len(dataset.classes), cfg.tasks)
    features = None
    if generic.load_generic(zoo, cfg, layout.fingerprint, plan.held_out_classes) is None:
        net, metrics, features = generic.train_generic(cfg, dataset, layout.fingerprint, plan.held_out_classes)
        generic.save_generic(zoo, net, metrics)
    if not (zoo / "vocab.safetensors").is_file():
        log.info("encoding %d classes x %d variants with %s", len(dataset.classes), NUM_VARIANTS, cfg.text_encoder)
        write_vocab(zoo, dataset.classes, get_text_encoder(cfg.text_encoder), class_variants)
    plan_json = {
        "dataset": {**cfg.dataset.record(), "classes": list(dataset.classes), "image": dataset.image.to_dict()},
        "target": cfg.target, "token_size": cfg.token_size,
        "layout": layout.to_dict(), "layout_fingerprint": layout.fingerprint,
        "text_encoder": cfg.text_encoder, "num_variants": NUM_VARIANTS,
        "config": identity(cfg), "config_hash": config_hash(cfg), "identity_hash": identity_hash(cfg),
        **plan.to_dict(),
    }  # fmt: skip
    write_json(zoo / PLAN, plan_json)  # last: its presence tells other ranks that preparation is done
    return plan_json, features


def make_fit_data(cfg: ZooConfig, dataset, state: dict, features: dict | None) -> fit.FitData:
    gen = torch.Generator().manual_seed(cfg.finetune.seed)
    n = len(dataset.classes)
    train_order, train_start, train_count = fit.class_index(torch.from_numpy(dataset.train_y), n, cfg.finetune.train_per_class, gen)
    eval_order, eval_start, eval_count = fit.class_index(torch.from_numpy(dataset.test_y), n, cfg.finetune.eval_per_class, gen)
    if features is None:
        net = generic.build_net(cfg, dataset.image, n)
        net.load_state_dict(state, strict=True)
        # Only the images fine-tuning and evaluation use go through the generic network, once.
        eval_features = generic.extract_features(net, dataset.test_x, desc="generic features", rows=eval_order)
        if get_target(cfg.target).head_only:  # the frozen backbone: heads train on features
            train = generic.extract_features(net, dataset.train_x, desc="train features", rows=train_order)
            evals = eval_features
        else:
            train, evals = torch.from_numpy(dataset.train_x), torch.from_numpy(dataset.test_x)
    else:
        train, evals, eval_features = features["train"], features["test"], features["test"]
    return fit.FitData(
        train, train_order, train_start, train_count, evals, eval_order, eval_start, eval_count,
        torch.tensor(dataset.image.mean), torch.tensor(dataset.image.std), eval_features,
    )  # fmt: skip


@dataclass
class ShardContext:
    """What every shard of a build needs, loaded once."""

    cfg: ZooConfig
    zoo: Path
    net: object  # fit.StackedCNN5k (cnn-5k's fast path) or stack.FuncStack (any target)
    generic: dict[str, torch.Tensor]  # generic model state dict
    data: fit.FitData
    layout: ParamLayout
    names: list[str]  # class names
    variants: torch.Tensor  # (num_classes, V, E) text embeddings
    prompts: list[list[str]]  # variant strings per class
    proxy: dict[int, int]  # strictly held-out class -> nearest known class by name embedding (its selection row)
    group_size: int  # models per stacked computation (runtime, resolved for the device)
    models_per_call: int  # models per forward/backward call (0 = the whole group)


def build_shards(ctx: ShardContext, shards: list, pool: ThreadPoolExecutor, bar) -> None:
    """Fine-tune the tasks of a few shards together, in groups (on parallel threads), then write
    each shard atomically. Groups may span shards: a GPU wants thousands of models per group,
    more than one shard holds."""
    fc, names, prompts, size = ctx.cfg.finetune, ctx.names, ctx.prompts, ctx.group_size
    tasks = [t for sh in shards for t in sh.tasks]
    groups = [tasks[lo : lo + size] for lo in range(0, len(tasks), size)]

    def run(j):
        # Each model's random stream is keyed by its task number: results never depend on grouping or scheduling.
        keys = fit.model_keys(fc.seed, [task_number(t.task_id) for t in groups[j]])
        res = fit.fit_group(ctx.net, ctx.generic, [list(t.classes) for t in groups[j]], keys, ctx.data, fc, ctx.models_per_call,
                            ctx.proxy)
        bar.update(len(groups[j]))
        return res

    samples = {}
    for group, res in zip(groups, pool.map(run, range(len(groups)))):
        for i, task in enumerate(group):
            flat = ctx.layout.flatten(res.state_dicts[i])
            ids = list(task.classes)
            metrics = {"task_id": task.task_id, "split": task.split, "k": len(ids),
                       "oracle_acc": round(res.oracle_acc[i], 5), "selection_acc": round(res.selection_acc[i], 5),
                       "steps": fc.steps, "final_loss": round(res.final_loss[i], 5)}  # fmt: skip
            samples[task.task_id] = encode_sample(task, flat, [names[c] for c in ids], ctx.variants[ids],
                                                  [prompts[c] for c in ids], metrics)  # fmt: skip
    for sh in shards:
        write_shard(ctx.zoo / sh.name, [(t.task_id, samples[t.task_id]) for t in sh.tasks])


def shard_batches(todo: list, group_size: int) -> list[list]:
    """Consecutive shards batched until they hold at least one group's worth of tasks (>= 1 shard each)."""
    batches, cur, n = [], [], 0
    for sh in todo:
        cur.append(sh)
        n += len(sh.tasks)
        if n >= group_size:
            batches.append(cur)
            cur, n = [], 0
    return batches + ([cur] if cur else [])


def finalize(zoo: Path, plan_json: dict, shards) -> dict | None:
    """Write manifest.json if every shard exists; returns it (None while shards are missing)."""
    missing = [s.name for s in shards if not (zoo / s.name).is_file()]
    if missing:
        log.info("%d shard(s) still missing (e.g. %s); another rank will finalize", len(missing), missing[0])
        return None
    gm = read_json(zoo / generic.GENERIC_METRICS)
    man = build_manifest(zoo, plan_json, shards, gm)
    write_json(zoo / MANIFEST, man)
    log.info("zoo finished: %s", man["metrics"])
    return man


def build(cfg: ZooConfig, rank: int = 0, world_size: int = 1) -> dict | None:
    """Build (or resume) the zoo of `cfg`; returns the manifest when this call completed the zoo."""
    from tina.training.datasets import load_dataset
    from tina.prompts import class_variants

    if not 0 <= rank < world_size:
        raise TinaError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    zoo = writable_folder(cfg.out, "out", create=False)  # created once the config has passed its checks
    device = cfg.runtime.resolved_device()
    threads, workers = cfg.runtime.resolved_threads(), cfg.runtime.resolved_workers(device)
    torch.set_num_threads(threads)
    fit.tune_malloc()
    t0 = time.perf_counter()

    log.info("rank %d/%d: loading %s", rank, world_size, cfg.dataset.name)
    dataset = load_dataset(cfg.dataset)
    if cfg.tasks.k_max > len(dataset.classes):
        raise TinaError(f"tasks.k_max={cfg.tasks.k_max} exceeds the {len(dataset.classes)} classes of {cfg.dataset.name}")
    writable_folder(zoo, "out")
    layout = layout_for(cfg.target, dataset.image, cfg.token_size)
    plan_path = zoo / PLAN
    if rank == 0 and not (zoo / VOCAB).is_file():
        # Missing or wrong text-encoder weights fail now, not after the generic model has trained.
        from tina.text import get_text_encoder

        get_text_encoder(cfg.text_encoder).load()
    if plan_path.is_file():
        _check_plan(read_json(plan_path), cfg, layout, zoo)
    if rank == 0:
        remove_stale_tmp(zoo, [PLAN, MANIFEST, VOCAB, "config.yaml", generic.GENERIC_WEIGHTS, generic.GENERIC_METRICS])
        save_config(cfg, zoo / "config.yaml")
        plan_json, features = (read_json(plan_path), None) if plan_path.is_file() else prepare(cfg, zoo, dataset)
    else:
        features = None
        plan_json = _wait_for_plan(plan_path, cfg, layout)
    plan = TaskPlan.from_dict(plan_json)
    shards = plan_shards(plan, cfg.shard_size)
    if (zoo / MANIFEST).is_file():
        log.info("%s is already complete", zoo)
        return read_json(zoo / MANIFEST)

    loaded = generic.load_generic(zoo, cfg, layout.fingerprint, plan.held_out_classes)
    if loaded is None:
        raise TinaError(f"{zoo / generic.GENERIC_WEIGHTS} is missing or was trained with other settings; delete {zoo} and rebuild")
    state = loaded[0]
    data = make_fit_data(cfg, dataset, state, features).to(device)
    vocab = load_vocab(zoo)
    proxy = nearest_known(vocab["names"], plan.held_out_classes)
    if proxy:
        log.info("held-out classes start from their nearest known class: %s",
                 ", ".join(f"{dataset.classes[h]} -> {dataset.classes[k]}" for h, k in proxy.items()))
    ctx = ShardContext(cfg, zoo, _fit_net(cfg, dataset.image, layout, state), state, data, layout,
                       list(dataset.classes), vocab["variants"], [class_variants(c) for c in dataset.classes], proxy,
                       cfg.runtime.resolved_group_size(device), cfg.runtime.models_per_call(device, cfg.finetune.batch_size))

    mine = [s for s in shards if s.index % world_size == rank]
    remove_stale_tmp(zoo, [s.name for s in mine])
    todo = [s for s in mine if not (zoo / s.name).is_file()]
    total, done = sum(len(s.tasks) for s in mine), sum(len(s.tasks) for s in mine if s not in todo)
    log.info("rank %d/%d: %d of %d shard(s) to build (%d models) on %s, groups of %d, %d worker(s) x %d thread(s)",
             rank, world_size, len(todo), len(mine), total - done, device, ctx.group_size,
             workers, max(1, threads // workers))  # fmt: skip
    torch.set_num_threads(max(1, threads // workers))  # parallel groups, each single-threaded by default
    bar = tqdm(total=total, initial=done, desc=f"zoo {zoo.name}", unit="model", smoothing=0.05)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # CPU: one shard at a time (its groups on parallel workers); GPU: enough shards for a full group.
            per_batch = ctx.group_size if workers == 1 else 1
            for batch in shard_batches(todo, per_batch):
                build_shards(ctx, batch, pool, bar)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    log.info("rank %d finished its shards in %.0f s", rank, time.perf_counter() - t0)
    return finalize(zoo, plan_json, shards)


def _check_plan(plan_json: dict, cfg: ZooConfig, layout: ParamLayout, zoo: Path) -> None:
    """A zoo folder resumes only with the config and target architecture it was started with."""
    if plan_json.get("identity_hash") != identity_hash(cfg):
        raise TinaError(f"{zoo} holds a zoo built with another config; choose another out= or delete the folder")
    if plan_json.get("layout_fingerprint") != layout.fingerprint:
        raise TinaError(f"{zoo} holds a zoo of another {cfg.target} architecture (layout "
                        f"{plan_json.get('layout_fingerprint')} vs {layout.fingerprint}); delete the folder and rebuild")  # fmt: skip


def _wait_for_plan(plan_path: Path, cfg: ZooConfig, layout: ParamLayout) -> dict:
    t0 = time.monotonic()
    while not plan_path.is_file():
        if time.monotonic() - t0 > WAIT_SECONDS:
            raise TinaError(f"gave up waiting for rank 0 to write {plan_path}")
        time.sleep(5)
    plan_json = read_json(plan_path)
    _check_plan(plan_json, cfg, layout, plan_path.parent)
    return plan_json


def main(argv: list[str] | None = None) -> int:
    """CLI: `build CONFIG [key=value ...] [--rank R --world-size W]`. TinaError -> message, exit 2."""
    ap = ArgumentParser(prog="python -m zoo_builder", description="Build a zoo of personalized models.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build or resume a zoo", description=__doc__, epilog=config_help(ZooConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("config", help="a YAML file, e.g. configs/zoo/fashion_mnist.yaml")
    b.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tasks.train=100 out=zoos/small")
    b.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    b.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(ZooConfig, args.config, args.overrides)
        t0 = time.perf_counter()
        man = build(cfg, rank=args.rank, world_size=args.world_size)
        if man is not None:
            m = man["metrics"]
            print(f"zoo {cfg.out}: {man['counts']['models']} models in {time.perf_counter() - t0:.0f} s; "
                  + "; ".join(f"{s}: oracle {v['oracle_acc']:.4f} selection {v['selection_acc']:.4f}" for s, v in m.items()))  # fmt: skip
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
