"""Train a generator on a zoo and export it as a bundle: `tina train CONFIG key=value ...`.

One CPU to many GPUs through Lightning: `trainer.devices`, `trainer.num_nodes` and
`trainer.strategy` come from the config; the global batch is split across ranks; bf16 on GPU.
A run folder holds the resolved config, Lightning checkpoints (exact resume: model, EMA, optimiser,
schedule, step) and, at the end, the exported bundle.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tina.config import at_least, config_help, load_config, save_config
from tina.training.data import (
    AugmentConfig, ZooDataModule, fit_layout_stats, layout_from_manifest, load_anchor, load_split, read_manifest,
)  # fmt: skip
from tina.diffusion import DiffusionConfig
from tina.errors import TinaError
from tina.layout import ParamLayout
from tina.training.lit_module import OptimConfig, TinaLitModule, ValConfig, validate_generated
from tina.training.task_loss import TaskLoss, TaskLossConfig
from tina.model import DIT_SIZES, build_dit
from tina.validate import ArgumentParser, writable_folder

log = logging.getLogger(__name__)


@dataclass
class GeneratorConfig:
    size: str = "DiT-S"  # a name from tina.model.DIT_SIZES

    def __post_init__(self):
        if self.size not in DIT_SIZES:
            raise ValueError(f"generator.size must be one of {sorted(DIT_SIZES)}, got {self.size!r}")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    max_steps: int = 3000
    batch_size: int = 64  # global; each rank gets batch_size // world_size
    workers: int = 0  # DataLoader workers per rank
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count ("4") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # e.g. "ddp"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    grad_clip: float = 1.0
    val_every: int = 500  # steps between generated-accuracy validations
    log_every: int = 25
    ckpt_every: int = 500
    seed: int = 0
    final_val_tasks: int = 100  # held-out tasks measured at the end, written into the bundle

    def __post_init__(self):
        at_least("trainer", max_steps=(self.max_steps, 1), batch_size=(self.batch_size, 1), workers=(self.workers, 0),
                 num_nodes=(self.num_nodes, 1), grad_clip=(self.grad_clip, 0), val_every=(self.val_every, 1),
                 log_every=(self.log_every, 1), ckpt_every=(self.ckpt_every, 1), seed=(self.seed, 0),
                 final_val_tasks=(self.final_val_tasks, 0))


@dataclass
class TrainConfig:
    zoo: str = "zoos/fashion_mnist"
    out: str = "runs/fashion_mnist"
    data_root: str | None = None  # dataset location for validation (default: the dataset's own default)
    resume: bool = True  # continue from out/checkpoints/last.ckpt when present
    # Warm start: a generator folder (a shipped name or a path) trained on a zoo of the same layout and
    # text encoder; its weights start both the DiT and its EMA, and its normalisation statistics are
    # kept (so its residual scale is the one the weights learned). Fresh optimiser and schedule.
    init_from: str | None = None
    token_size: int = 0  # numbers per parameter token; 0 = the zoo's (flat vectors do not depend on it)
    # Generate residuals from classifier selection (the zoo's generic model travels in the bundle;
    # tina/anchor.py) instead of whole weight vectors.
    residual: bool = True
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val: ValConfig = field(default_factory=ValConfig)
    task_loss: TaskLossConfig = field(default_factory=TaskLossConfig)

    def __post_init__(self):
        if self.task_loss.weight > 0 and self.diffusion.prediction != "x0":
            raise ValueError(f"task_loss scores the x0 prediction: set diffusion.prediction=x0 (got {self.diffusion.prediction}) "
                             "or task_loss.weight=0")


def resolve_val_split(man: dict, split: str) -> str:
    """`auto` -> "val" when the zoo has val tasks, else "unseen_combo" (with a warning: tuning on it
    would leave no untouched test split)."""
    counts = man.get("counts", {})
    if split != "auto":
        if not counts.get(split):
            raise TinaError(f"val.split={split}: the zoo has no {split} tasks (it has {counts})")
        return split
    if counts.get("val"):
        return "val"
    log.warning("the zoo has no val split (tasks.val=0): validating on unseen_combo, the test split")
    return "unseen_combo"


def _devices(spec: str):
    if spec == "auto":
        return "auto"
    if "," in spec:
        return [int(x) for x in spec.split(",") if x]
    return int(spec)


def _rank() -> tuple[int, int]:
    """(global rank, world size) as the launcher set them (torchrun, SLURM, Lightning's ddp re-launch);
    (0, 1) in a single process and in the parent of ddp_spawn, which is rank zero."""
    import os

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _warm_start(spec: str, layout: ParamLayout, man: dict):
    """The generator folder `spec`, checked to fit this zoo: same target, layout structure and text encoder."""
    from tina.bundle import load_bundle
    from tina.registry import resolve_checkpoint

    bundle = load_bundle(resolve_checkpoint(spec))
    if bundle.layout.fingerprint != layout.fingerprint or bundle.target != man["target"]:
        raise TinaError(f"init_from={spec}: its layout ({bundle.target}, {bundle.layout.fingerprint}) differs from the "
                        f"zoo's ({man['target']}, {layout.fingerprint}); set token_size to match or drop init_from")
    if bundle.text_encoder != man["text_encoder"]:
        raise TinaError(f"init_from={spec}: text encoder {bundle.text_encoder!r} differs from the zoo's {man['text_encoder']!r}")
    return bundle


def train(cfg: TrainConfig) -> Path | None:
    """Fit, then export the EMA generator to OUT/bundle; returns the bundle path on rank zero, None on
    the other ranks. Only rank zero validates and writes (config, checkpoints, logs, bundle)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from safetensors.torch import load_file

    from tina.bundle import Bundle, save_bundle
    from tina.training.datasets import DatasetConfig, load_dataset
    from tina.targets import ImageSpec

    rank, world = _rank()
    log.info("rank %d/%d: preparing (zoo %s, run %s)", rank, world, cfg.zoo, cfg.out)
    out = writable_folder(cfg.out, "out", create=False)  # created once the zoo has passed its checks
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # no stderr line of its own

    zoo = Path(cfg.zoo)
    man = read_manifest(zoo)
    layout = layout_from_manifest(man)
    if cfg.token_size and cfg.token_size != layout.token_size:
        layout = ParamLayout.from_dict({**layout.to_dict(), "token_size": cfg.token_size})
    anchor = load_anchor(zoo, layout) if cfg.residual else None
    warm = _warm_start(cfg.init_from, layout, man) if cfg.init_from else None
    if warm is not None:
        layout = warm.layout
    else:
        fit_layout_stats(zoo, layout, anchor=anchor)
    vocab_t = load_file(zoo / "vocab.safetensors")
    # Strictly held-out classes stay out of the generator's vocabulary (and its anchor): it never hears their names.
    held = set(man.get("held_out_classes", []))
    known = [c for c in range(len(man["dataset"]["classes"])) if c not in held]
    cond_dim = vocab_t["names"].shape[-1]
    dit = build_dit(cfg.generator.size, token_size=layout.token_size, n_body_tokens=layout.n_body_tokens,
                    tokens_per_class=layout.tokens_per_class, cond_dim=cond_dim)
    if warm is not None:
        try:
            dit.load_state_dict({k: v.float() for k, v in warm.dit.state_dict().items()}, strict=True)
        except RuntimeError as e:
            raise TinaError(f"init_from={cfg.init_from}: its generator is not a {cfg.generator.size} for this layout "
                            f"({str(e).splitlines()[0]})") from None
        log.info("warm start from %s (%s steps before)", cfg.init_from, warm.meta.get("training", {}).get("steps", "?"))
    log.info("generator %s: %.2fM parameters; %r", cfg.generator.size, sum(p.numel() for p in dit.parameters()) / 1e6, layout)

    dataset = load_dataset(man["dataset"], cfg.data_root)
    cfg.val.split = resolve_val_split(man, cfg.val.split)
    val_models = load_split(zoo, cfg.val.split, limit=cfg.val.tasks)
    base = {}
    if layout.frozen:  # head-on-backbone targets: the frozen backbone (weights and buffers) travels with the generator
        generic = load_file(zoo / "generic.safetensors")
        base = {k: generic[k] for k in layout.frozen}
    task_loss = None
    if cfg.task_loss.weight > 0:
        task_loss = TaskLoss(cfg.task_loss, layout, man["target"], dataset, anchor, base, cfg.diffusion.num_train_timesteps)
    module = TinaLitModule(dit, layout, cfg.diffusion, cfg.optim, cfg.trainer.max_steps, cfg.val, val_models, dataset, man["target"],
                          anchor, seed=cfg.trainer.seed, class_emb=vocab_t["names"].float(), base=base, task_loss=task_loss)
    data = ZooDataModule(zoo, layout, cfg.augment, cfg.trainer.batch_size, cfg.trainer.workers, cfg.trainer.seed, anchor)

    if rank == 0:  # only rank zero writes
        writable_folder(out, "out")
        save_config(cfg, out / "config.yaml")
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "32-true"
    ckpt_dir = out / "checkpoints"
    trainer = L.Trainer(
        max_steps=cfg.trainer.max_steps,
        accelerator=cfg.trainer.accelerator,
        devices=_devices(cfg.trainer.devices),
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=precision,
        gradient_clip_val=cfg.trainer.grad_clip,
        val_check_interval=cfg.trainer.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every,
        logger=CSVLogger(out, name="logs"),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.trainer.ckpt_every, save_last=True, save_top_k=0)],
        enable_progress_bar=True,
        enable_model_summary=False,
    )
    last = ckpt_dir / "last.ckpt"
    t0 = time.perf_counter()
    # Resuming reads a Lightning checkpoint this run wrote itself (never a user-supplied file).
    log.info("rank %d/%d: fitting %d steps", trainer.global_rank, trainer.world_size, cfg.trainer.max_steps)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if cfg.resume and last.is_file() else None)
    seconds = time.perf_counter() - t0
    log.info("rank %d/%d: fit done in %.0f s", trainer.global_rank, trainer.world_size, seconds)
    if not trainer.is_global_zero:
        return None

    ema = module.ema.float().cpu().eval()
    final_models = load_split(zoo, cfg.val.split, limit=cfg.trainer.final_val_tasks)
    image = ImageSpec.from_dict(man["dataset"]["image"])
    metrics = validate_generated(ema, layout, module.sched_config, final_models, dataset, man["target"], cfg.val,
                                 cfg.diffusion, base, anchor, class_emb=vocab_t["names"].float()) if final_models else {}
    log.info("final held-out metrics: %s", metrics)
    bundle = Bundle(
        dit=ema, layout=layout, scheduler_config=module.sched_config, target=man["target"], image=image,
        dataset=man["dataset"]["name"], text_encoder=man["text_encoder"], k_max=int(man["config"]["tasks"]["k_max"]),
        vocab=[man["dataset"]["classes"][c] for c in known], vocab_emb=vocab_t["names"].float()[known], base=base, anchor=anchor,
        meta={
            "dataset_config": DatasetConfig.from_record(man["dataset"]).record(),  # the demo's sample images
            "sampling": {"sampler": cfg.diffusion.sampler, "steps": cfg.diffusion.steps, "guidance": cfg.diffusion.guidance},
            "metrics": {"split": cfg.val.split, "tasks": len(final_models), **metrics},
            "training": {"steps": int(trainer.global_step), "seconds": round(seconds, 1), "device": str(precision) + " " + (
                torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"), "generator_size": cfg.generator.size,
                "zoo": str(zoo), "zoo_models": data.num_models, "zoo_config_hash": man.get("config_hash"),
                "init_from": cfg.init_from, "steps_before": int(warm.meta.get("training", {}).get("steps", 0)) if warm else 0},
        },
    )
    path = save_bundle(bundle, out / "bundle", config_yaml=(out / "config.yaml").read_text())
    log.info("bundle written to %s", path)
    return path


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="tina train", description="Train a generator on a zoo and export a bundle.",
                        epilog=config_help(TrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (configs/train/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    args = ap.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    path = train(cfg)
    if path is not None:  # rank zero, after the bundle is on disk; other ranks print nothing
        print(f"generator bundle: {path}")
    return 0

