"""Generator training throughput: samples/s of full optimisation steps (forward, backward, AdamW).

    python -m benchmarks.train_throughput [--quick] [--sizes DiT-T DiT-S] [--batch-size 64] [--k 10] [--zoo ZOO]

The default training config (configs/train/fashion_mnist.yaml) gives the generator size, token size and batch
size measured first; without --quick the other sizes follow.

Batches are synthetic but shaped exactly like training batches of the real layout (cnn-5k tokens, tasks
of 2..k classes padded to k, the loss and optimiser of tina/training/lit_module.py), so data loading is left out;
with --zoo the data pipeline (shards → examples → padded batches) is timed on its own. On a GPU the step
runs in bf16 autocast like `tina train`, and tokens/s and model FLOPs utilisation (MFU) are reported:
FLOPs of one step are counted by torch.utils.flop_counter (matmuls and attention, forward + backward)
and divided by the step time and the device's dense bf16 peak (PEAK_TFLOPS, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks import cuda_peak_mb, peak_rss_mb, print_table

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; matched as substrings of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10G": 70.0, "RTX 4090": 165.0, "V100": 125.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def synthetic_batch(layout, batch_size: int, k: int, cond_dim: int, gen: torch.Generator) -> dict:
    """A training batch like tina.training.data.collate's: tasks of 2..k classes padded to k."""
    T, C = layout.num_tokens(k), layout.token_size
    ks = torch.randint(2, k + 1, (batch_size,), generator=gen)
    elem_mask = torch.zeros(batch_size, T, C, dtype=torch.bool)
    cond_mask = torch.zeros(batch_size, k, dtype=torch.bool)
    for i, ki in enumerate(ks.tolist()):
        n = layout.num_tokens(ki)
        elem_mask[i, :n] = layout.token_mask(ki)
        cond_mask[i, :ki] = True
    x0 = torch.randn(batch_size, T, C, generator=gen) * elem_mask
    cond = torch.nn.functional.normalize(torch.randn(batch_size, k, cond_dim, generator=gen), dim=-1) * cond_mask[..., None]
    return {"x0": x0, "elem_mask": elem_mask, "cond": cond, "cond_mask": cond_mask, "real_tokens": float(sum(layout.num_tokens(x) for x in ks.tolist()))}


def measure(size: str, batch_size: int = 64, k: int = 10, steps: int = 10, warmup: int = 2, device: str | None = None,
            target: str = "cnn-5k", token_size: int = 128, cond_dim: int = 384, image=None, peak_tflops: float | None = None) -> dict:
    """Time `steps` optimisation steps of one generator size; samples/s, tokens/s, FLOPs and MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from tina.diffusion import DiffusionConfig, make_scheduler, scheduler_config, training_loss
    from tina.layout import layout_for
    from tina.model import build_dit
    from tina.training.testing import FASHION_IMAGE

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layout = layout_for(target, image or FASHION_IMAGE, token_size)
    torch.manual_seed(0)
    dit = build_dit(size, token_size=layout.token_size, n_body_tokens=layout.n_body_tokens,
                    tokens_per_class=layout.tokens_per_class, cond_dim=cond_dim).to(dev).train()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, weight_decay=0.01)
    sched = make_scheduler(scheduler_config(DiffusionConfig()), "ddpm")
    b = synthetic_batch(layout, batch_size, k, cond_dim, torch.Generator().manual_seed(0))
    x0, em, cond, cm = (b[n].to(dev) for n in ("x0", "elem_mask", "cond", "cond_mask"))
    bf16 = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(dit, sched, x0, em, cond, cm, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with FlopCounterMode(display=False) as counter:
        step()  # also the first warm-up step
    flops = counter.get_total_flops()
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    T = layout.num_tokens(k)
    peak = peak_tflops or device_peak_tflops(dev)
    achieved = flops / sec
    return {
        "size": size, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": "bf16-mixed" if bf16 else "32-true", "parameters": sum(p.numel() for p in dit.parameters()),
        "batch_size": batch_size, "k": k, "token_size": token_size, "tokens_per_sample": T, "steps_timed": steps,
        "step_seconds": round(sec, 4), "samples_per_s": round(batch_size / sec, 1),
        "tokens_per_s": round(batch_size * T / sec, 0), "real_tokens_per_s": round(b["real_tokens"] / sec, 0),
        "gflop_per_step": round(flops / 1e9, 2), "achieved_tflops": round(achieved / 1e12, 4),
        "peak_tflops": peak, "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
    }


def data_pipeline(zoo: str, batch_size: int = 64, batches: int = 20) -> dict:
    """Samples/s of the training data stream alone (shards → augmented examples → padded batches)."""
    from functools import partial

    from tina.training.data import AugmentConfig, ZooStream, collate, fit_layout_stats, layout_from_manifest, read_manifest, shard_urls

    man = read_manifest(zoo)
    layout = layout_from_manifest(man)
    fit_layout_stats(zoo, layout, limit=500)
    loader = torch.utils.data.DataLoader(ZooStream(shard_urls(zoo, man, "train"), layout, AugmentConfig(), seed=0),
                                         batch_size=batch_size, collate_fn=partial(collate, layout=layout))
    it = iter(loader)
    next(it)  # opening and hashing shards
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    sec = time.perf_counter() - t0
    return {"zoo": str(zoo), "batch_size": batch_size, "samples_per_s": round(batches * batch_size / sec, 1)}


TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "fashion_mnist.yaml"


def run(quick: bool = False, sizes: list[str] | None = None, batch_size: int | None = None, k: int = 10, zoo: str | None = None,
        device: str | None = None, peak_tflops: float | None = None, train_config: str | Path = TRAIN_CONFIG) -> dict:
    """The default training config's generator (size, token size, batch) first, then the other sizes."""
    from tina.config import load_config
    from tina.training.train import TrainConfig

    tc = load_config(TrainConfig, train_config)
    token_size = tc.token_size or 128  # 0 = the zoo's; zoo configs use 128
    batch_size = batch_size or tc.trainer.batch_size
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    others = ["DiT-T", "DiT-S", "DiT-M", "DiT-B"] if on_gpu else ["DiT-T", "DiT-S"]
    sizes = sizes or [tc.generator.size] + ([] if quick else [s for s in others if s != tc.generator.size])
    steps = (20 if on_gpu else 3) if quick else (50 if on_gpu else 10)
    out = {"train_config": str(train_config), "generator": [
        measure(s, batch_size, k, steps=steps, warmup=2 if quick else 3, device=device, token_size=token_size,
                peak_tflops=peak_tflops) for s in sizes]}
    if zoo:
        out["data_pipeline"] = data_pipeline(zoo, batch_size, batches=5 if quick else 20)
    out["peak_rss_mb"] = peak_rss_mb()
    out["cuda_peak_mb"] = cuda_peak_mb()
    return out


def rows(r: dict) -> list[tuple[str, object]]:
    out = []
    for g in r["generator"]:
        p = f"{g['size']} ({g['parameters'] / 1e6:.2f}M, batch {g['batch_size']}, k={g['k']}, C={g['token_size']}, {g['precision']})"
        out += [(f"{p}: samples/s", g["samples_per_s"]), (f"{g['size']}: tokens/s", g["tokens_per_s"]),
                (f"{g['size']}: TFLOP/s achieved", g["achieved_tflops"])]
        if g["mfu"] is not None:
            out.append((f"{g['size']}: MFU", g["mfu"]))
    if "data_pipeline" in r:
        out.append(("data pipeline samples/s", r["data_pipeline"]["samples_per_s"]))
    out.append(("peak RSS MiB", r["peak_rss_mb"]))
    if r.get("cuda_peak_mb") is not None:
        out.append(("CUDA peak MiB", r["cuda_peak_mb"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", nargs="+")
    ap.add_argument("--batch-size", type=int, help="default: the train config's")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--zoo")
    ap.add_argument("--device")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, where PEAK_TFLOPS lacks it")
    ap.add_argument("--train-config", default=str(TRAIN_CONFIG), help="whose generator size, token size and batch are measured")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    r = run(args.quick, args.sizes, args.batch_size, args.k, args.zoo, args.device, args.peak_tflops, args.train_config)
    print_table("generator training throughput", rows(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
