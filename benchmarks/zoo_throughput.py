"""Zoo fine-tuning throughput: the batched trainer vs a plain one-model-at-a-time loop, at equal work.

    python benchmarks/zoo_throughput.py [--models 48 --steps 50 --batch 32] [--json out.json]

Both sides train the same number of cnn-5k models x steps x minibatch on the same kind of data
(uint8 28x28 images gathered per step from a 60,000-image pool, normalised, class labels), starting
from the same weights. Reported: models/minute (at this step count) and achieved GFLOP/s (nominal
training FLOPs = 3 x forward), next to this machine's measured 2048x2048 float32 matmul GFLOP/s.
Rows:
  batched (W workers x 1 thread)   zoo_builder.fit as the build runs it: groups on worker threads
  batched (1 worker x T threads)   one group at a time, torch's intra-op threads
  batched bf16 (W workers x 1 thread)  the convolutions in bfloat16 (finetune.precision=bf16; oneDNN's
                                   AVX512-BF16 matmuls), float32 master weights, head and Adam
  loop, nn.Module (NCHW)           TargetNet + torch.optim.Adam per model, torch defaults
  loop, nn.Module (channels-last)  the same with channels-last tensors (oneDNN's fast path)
  loop, nn.Module (NCHW, 1 thread)  the plain loop without intra-op threads
  loop, nn.Module (bf16 autocast)  the plain loop under torch.autocast("cpu", bfloat16): the fair
                                   baseline for the bf16 row
"speedup" is against the plain loop (NCHW, torch's default threads). On a shared machine the
wall-clock columns depend on the load; GFLOP per CPU-second does much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from tina.targets import ImageSpec, get_target
from zoo_builder import fit

IMAGE = ImageSpec(1, 28, (0.286,), (0.353,))


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e9


def make_data(num_classes: int = 10, n: int = 60000, seed: int = 0) -> fit.FitData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 28, 28, 1), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % num_classes
    order, start, count = fit.class_index(y, num_classes, 0, g)
    mean, std = torch.tensor(IMAGE.mean), torch.tensor(IMAGE.std)
    return fit.FitData(x, order, start, count, x, order, start, count, mean, std, torch.zeros(n, 24))


def tasks_for(models: int, k: int, num_classes: int = 10) -> list[list[int]]:
    return [[(i + j) % num_classes for j in range(k)] for i in range(models)]


def run_batched(data, init, tasks, steps, batch, group_size, workers, threads, per_call, dtype=torch.float32) -> float:
    """Seconds to fine-tune every task with zoo_builder.fit (training only, no evaluation)."""
    net = fit.StackedCNN5k(1, 28, dtype)
    groups = [tasks[lo : lo + group_size] for lo in range(0, len(tasks), group_size)]

    def one(j):
        gt = groups[j]
        k_max = max(len(t) for t in gt)
        ids, ks, kmask = fit.class_tables(gt, k_max)
        sds = [dict(init, **{"head.weight": init["head.weight"][t], "head.bias": init["head.bias"][t]}) for t in gt]
        trainer = fit.StackedTrainer(net, net.pack(sds, k_max), kmask, 1e-3, per_call)
        gen = torch.Generator().manual_seed(j)
        for _ in range(steps):
            idx, y = fit.sample_batch(data, ids, ks, batch, gen)
            trainer.step(data.inputs(data.train, idx), y)

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(groups))))
    return time.perf_counter() - t0


def run_loop(data, init, tasks, steps, batch, threads, channels_last: bool, bf16: bool = False) -> float:
    """Seconds for the same work as plain nn.Module training, one model after another."""
    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for t in tasks:
        net = get_target("cnn-5k").build(len(t), IMAGE)
        net.load_state_dict(dict(init, **{"head.weight": init["head.weight"][t], "head.bias": init["head.bias"][t]}))
        net.to(memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        ids, ks, _ = fit.class_tables([t], len(t))
        for _ in range(steps):
            idx, y = fit.sample_batch(data, ids, ks, batch, gen)
            x = data.train[idx[0]].permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=fmt)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x).float(), y[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): under a loaded machine, work per CPU-second still
    compares the methods' efficiency even when wall-clock numbers are distorted."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=48)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=10, help="classes per model")
    ap.add_argument("--group-size", type=int, default=24)
    ap.add_argument("--images-per-call", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    fit.tune_malloc()
    torch.set_num_threads(args.threads)
    data = make_data()
    torch.manual_seed(0)
    init = get_target("cnn-5k").build(10, IMAGE).state_dict()
    tasks = tasks_for(args.models, args.k)
    work = args.models * args.steps * args.batch * fit.training_flops("cnn-5k", 1, 28, args.k)
    per_call = max(1, args.images_per_call // args.batch)
    mm = matmul_gflops()
    T = args.threads
    runs = {
        f"batched ({T} workers x 1 thread)": lambda: run_batched(data, init, tasks, args.steps, args.batch, args.group_size, T, 1, per_call),
        f"batched (1 worker x {T} threads)": lambda: run_batched(data, init, tasks, args.steps, args.batch, args.group_size, 1, T, per_call),
        f"batched bf16 ({T} workers x 1 thread)": lambda: run_batched(data, init, tasks, args.steps, args.batch, args.group_size, T, 1,
                                                                      per_call, torch.bfloat16),
        "loop, nn.Module (NCHW)": lambda: run_loop(data, init, tasks, args.steps, args.batch, T, False),
        "loop, nn.Module (channels-last)": lambda: run_loop(data, init, tasks, args.steps, args.batch, T, True),
        "loop, nn.Module (NCHW, 1 thread)": lambda: run_loop(data, init, tasks, args.steps, args.batch, 1, False),
        "loop, nn.Module (bf16 autocast)": lambda: run_loop(data, init, tasks, args.steps, args.batch, T, False, bf16=True),
    }  # fmt: skip
    # Warm up every path on a little work, then time each once at full size.
    small = tasks[:2]
    run_batched(data, init, small, 2, args.batch, args.group_size, 1, T, per_call)
    run_batched(data, init, small, 2, args.batch, args.group_size, 1, T, per_call, torch.bfloat16)
    run_loop(data, init, small, 2, args.batch, T, False)
    rows = []
    for name, fn in runs.items():
        cpu0 = _cpu_seconds()
        sec = fn()
        cpu = _cpu_seconds() - cpu0
        rows.append({"name": name, "seconds": round(sec, 2), "cpu_seconds": round(cpu, 2),
                     "models_per_minute": round(args.models / sec * 60, 1), "gflops": round(work / sec / 1e9, 1),
                     "gflop_per_cpu_second": round(work / cpu / 1e9, 1)})  # fmt: skip
    base = next(r for r in rows if r["name"] == "loop, nn.Module (NCHW)")
    for r in rows:
        r["speedup_vs_loop"] = round(base["seconds"] / r["seconds"], 2)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "threads": T, "torch": torch.__version__, "platform": platform.platform(),
                    "matmul_2048_gflops": round(mm, 1), "load_avg_1min": round(os.getloadavg()[0], 2)},
        "work": {"models": args.models, "steps": args.steps, "batch": args.batch, "k": args.k,
                 "gflop": round(work / 1e9, 1)},
        "rows": rows,
    }  # fmt: skip
    print(f"cnn-5k fine-tuning, {args.models} models x {args.steps} steps x batch {args.batch} (k={args.k}), "
          f"{work / 1e9:.0f} GFLOP; 2048^2 matmul: {mm:.0f} GFLOP/s; load avg {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'trainer':40s} {'seconds':>8s} {'models/min':>11s} {'GFLOP/s':>8s} {'vs loop':>8s} {'cpu s':>7s} {'GFLOP/cpu-s':>12s}")
    for r in rows:
        print(f"{r['name']:40s} {r['seconds']:8.2f} {r['models_per_minute']:11.1f} {r['gflops']:8.1f} "
              f"{r['speedup_vs_loop']:7.2f}x {r['cpu_seconds']:7.2f} {r['gflop_per_cpu_second']:12.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
