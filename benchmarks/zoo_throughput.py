"""Zoo fine-tuning throughput: the batched trainer vs a plain one-model-at-a-time loop, at equal work.

    python -m benchmarks.zoo_throughput [--models 48 --steps 50 --batch 32 --repeats 3] [--json out.json]
    python -m benchmarks.zoo_throughput --device cuda --models 8192     # on a GPU

Both sides train the same number of cnn-5k models x steps x minibatch on the same kind of data
(uint8 28x28 images gathered per step from a 60,000-image pool, normalised, class labels), starting
from the same weights. Reported: models/minute (at this step count) and achieved GFLOP/s (nominal
training FLOPs = 3 x forward), next to this machine's measured 2048x2048 matmul GFLOP/s in float32 and
bfloat16, each row's share of that rate, and the ceiling it sets: no trainer of the loop's FLOPs runs a
step faster than the matmul rate, so (matmul rate / the loop's GFLOP/s) bounds any speedup over the loop.
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
On a GPU (--device cuda) the batched rows train every model in one group (one call per step), in
float32 and bf16, and the loop rows train --loop-models models (32): the loop's time is linear in
models, so models/minute compares the two at equal work per model.
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
from benchmarks import median
from zoo_builder.config import RuntimeConfig
from zoo_builder.stack import FuncStack

IMAGE = ImageSpec(1, 28, (0.286,), (0.353,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int = 2048, reps: int = 10, device: torch.device = torch.device("cpu"),
                  dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate in dtype (on a GPU, float32 is torch's default: full precision). A large
    square matmul is about the fastest arithmetic the machine does: no trainer runs a whole step faster."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e9


def make_data(num_classes: int = 10, n: int = 60000, seed: int = 0, feature_dim: int = 0) -> fit.FitData:
    """A Fashion-MNIST-sized pool of uint8 images, or (feature_dim > 0) of precomputed backbone features."""
    g = torch.Generator().manual_seed(seed)
    if feature_dim:
        x = torch.randn(n, feature_dim, generator=g)
    else:
        x = torch.randint(0, 256, (n, 28, 28, 1), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % num_classes
    order, start, count = fit.class_index(y, num_classes, 0, g)
    mean, std = torch.tensor(IMAGE.mean), torch.tensor(IMAGE.std)
    return fit.FitData(x, order, start, count, x, order, start, count, mean, std, torch.zeros(n, 24))


def tasks_for(models: int, k: int, num_classes: int = 10) -> list[list[int]]:
    return [[(i + j) % num_classes for j in range(k)] for i in range(models)]


def run_batched(data, init, tasks, steps, batch, group_size, workers, threads, per_call, dtype=torch.float32,
                target: str = "cnn-5k", generic: bool = False, grouped: bool = True) -> float:
    """Seconds to fine-tune every task with zoo_builder.fit (training only, no evaluation), on data's device:
    through the generic trainer (zoo_builder/stack.py) or, for cnn-5k, its fast path (fit.StackedCNN5k)."""
    if generic or target != "cnn-5k":
        net = FuncStack(target, IMAGE, feature_dim=data.train.shape[1] if data.train.dtype != torch.uint8 else None,
                        dtype=dtype, grouped=grouped)
    else:
        net = fit.StackedCNN5k(1, 28, dtype)
    dev = data.train.device
    groups = [tasks[lo : lo + group_size] for lo in range(0, len(tasks), group_size)]

    def one(j):
        gt = groups[j]
        k_max = max(len(t) for t in gt)
        ids, ks, kmask = (t.to(dev) for t in fit.class_tables(gt, k_max))
        params = {n: t.to(dev) for n, t in net.pack(fit.selection_state_dicts(init, gt), k_max).items()}
        trainer = fit.StackedTrainer(net, params, kmask, 1e-3, per_call)
        keys = fit.model_keys(j, range(len(gt))).to(dev)
        for idx, y in fit.minibatches(data, ids, ks, batch, keys, steps):
            trainer.step(net.train_inputs(data, idx), y)

    torch.set_num_threads(threads)
    _sync(dev)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(groups))))
    _sync(dev)
    return time.perf_counter() - t0


def run_convs_only(tasks, steps, batch, group_size, workers, per_call, dtype=torch.float32, target: str = "cnn-5k") -> float:
    """Seconds for only the convolutions of the batched trainer's steps (the same grouped channels-last
    calls, forward and backward, in dtype), nothing around them: no pooling, activations, head, loss, Adam
    or data. A floor under the whole-network trainer's time, hence a ceiling on its speed-up."""
    net = get_target(target).build(10, IMAGE).eval()
    shapes = []  # (conv module, its input's (C, H, W)) in forward order
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append((m, a[0].shape[1:])))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.rand(1, IMAGE.channels, IMAGE.size, IMAGE.size))
    for h in hooks:
        h.remove()
    torch.set_num_threads(1)

    def one(models: int) -> None:
        calls = [min(per_call, models - lo) for lo in range(0, models, per_call)]  # models per call, as fit chunks them
        layers = {G: [(m, torch.rand(batch, G * c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_(i > 0),
                       torch.randn(G * m.out_channels, c // m.groups, *m.kernel_size, requires_grad=True))
                      for i, (m, (c, h, w)) in enumerate(shapes)]
                  for G in set(calls)}  # (conv, input, weight) per layer; the first conv's input needs no gradient
        for _ in range(steps):
            for G in calls:
                for m, x, wt in layers[G]:
                    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
                        y = F.conv2d(x, wt, None, m.stride, m.padding, m.dilation, m.groups * G)
                    torch.autograd.grad(y, [wt, x] if x.requires_grad else [wt], torch.ones_like(y))

    groups = [len(tasks[lo : lo + group_size]) for lo in range(0, len(tasks), group_size)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, groups))
    return time.perf_counter() - t0


def run_loop(data, init, tasks, steps, batch, threads, channels_last: bool, bf16: bool = False, target: str = "cnn-5k") -> float:
    """Seconds for the same work as plain nn.Module training, one model after another (a head-on-backbone
    target: its head as an nn.Module over the precomputed features, the cheapest honest loop)."""
    if get_target(target).head_only:
        return _run_head_loop(data, init, tasks, steps, batch, threads)
    torch.set_num_threads(threads)
    dev = data.train.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    _sync(dev)
    t0 = time.perf_counter()
    for m, t in enumerate(tasks):
        net = get_target(target).build(len(t), IMAGE)
        net.load_state_dict(fit.selection_state_dicts(init, [t])[0])
        net.to(dev, memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        ids, ks, _ = (x.to(dev) for x in fit.class_tables([t], len(t)))
        keys = fit.model_keys(0, [m]).to(dev)
        for step in range(steps):
            idx, y = fit.sample_batch(data, ids, ks, batch, keys, step)
            x = data.train[idx[0]].permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=fmt)
            with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x).float(), y[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync(dev)
    return time.perf_counter() - t0


def _run_head_loop(data, init, tasks, steps, batch, threads) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for m, t in enumerate(tasks):
        sd = fit.selection_state_dicts(init, [t])[0]
        head = torch.nn.Linear(sd["head.weight"].shape[1], len(t))
        head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        ids, ks, _ = fit.class_tables([t], len(t))
        keys = fit.model_keys(0, [m])
        for step in range(steps):
            idx, y = fit.sample_batch(data, ids, ks, batch, keys, step)
            loss = F.cross_entropy(head(data.train[idx[0]]), y[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def training_flops(target: str, k: int) -> float:
    """Nominal FLOPs of one training example of a target on IMAGE: 3 x a forward pass's multiply-adds x 2
    (a head-on-backbone target trains its head only, on features)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = get_target(target)
    net = spec.build(k, IMAGE).eval()
    if spec.head_only:
        return 3.0 * 2 * net.head.in_features * k
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(1, IMAGE.channels, IMAGE.size, IMAGE.size))
    return 3.0 * counter.get_total_flops()


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
    ap.add_argument("--group-size", type=int, default=0, help="0: 24 on CPU, every model in one group on a GPU")
    ap.add_argument("--images-per-call", type=int, default=0, help="0: the zoo builder's default (RuntimeConfig)")
    ap.add_argument("--loop-models", type=int, default=0,
                    help="models the one-at-a-time loop trains (0: --models on CPU, 32 on a GPU, where the loop "
                         "is linear in models and thousands would take many minutes)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all rows; each row reports its median")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--matmul-size", type=int, default=2048, help="side of the reference float32 matmul")
    ap.add_argument("--target", default="cnn-5k", help="any registered target (cnn-5k, cnn-33k, resnet20+linear, ...)")
    ap.add_argument("--rows", default="generic,fast,loop",
                    help="CPU rows: generic (zoo_builder/stack.py as the build runs it), generic-bf16 (its convolutions in "
                         "bfloat16), vmap (stack.py's vmap fallback), fast (cnn-5k's C kernels + manual backward), loop, loop1 (the loop on "
                         "one thread: beside other processes, the 2-thread loop loses most to their preemptions), loop-bf16 "
                         "(the loop under bf16 autocast: generic-bf16's like-for-like baseline), convs (only the generic "
                         "trainer's convolutions, float32 and bf16: a ceiling on its speed), and the extra variants "
                         "threads, bf16, loop-variants")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    fit.tune_malloc()
    torch.set_num_threads(args.threads)
    spec = get_target(args.target)
    torch.manual_seed(0)
    init = spec.build(10, IMAGE).state_dict()
    D = init["head.weight"].shape[1]
    data = make_data(feature_dim=D if spec.head_only else 0).to(dev)
    tasks = tasks_for(args.models, args.k)
    loop_tasks = tasks_for(args.loop_models or (32 if gpu else args.models), args.k)
    per_model = args.steps * args.batch * training_flops(args.target, args.k)
    group = args.group_size or (args.models if gpu else 24)
    per_call = RuntimeConfig(images_per_call=args.images_per_call).models_per_call(dev, args.batch)
    mm = matmul_gflops(args.matmul_size, device=dev)
    mm_bf16 = matmul_gflops(args.matmul_size, device=dev, dtype=torch.bfloat16)
    T = args.threads
    B, S = args.batch, args.steps
    # Each row: (its tasks, fn(tasks, steps) -> seconds).
    if gpu:
        runs = {
            f"batched fp32 (groups of {group})": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, 1, T, per_call)),
            f"batched bf16 (groups of {group})": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, 1, T, per_call,
                                                                                    torch.bfloat16)),
            "loop, nn.Module (NCHW)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, False)),
            "loop, nn.Module (channels-last)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, True)),
            "loop, nn.Module (bf16 autocast)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, False, bf16=True)),
        }  # fmt: skip
    else:
        want, tgt = set(args.rows.split(",")), args.target
        runs = {
            f"generic {tgt} ({T} workers x 1 thread)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, T, 1, per_call,
                                                                                          target=tgt, generic=True)),
            f"generic bf16 {tgt} ({T} workers x 1 thread)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, T, 1, per_call,
                                                                                               torch.bfloat16, target=tgt, generic=True)),
            f"generic vmap {tgt} ({T} workers x 1 thread)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, T, 1, per_call,
                                                                                               target=tgt, generic=True, grouped=False)),
            f"fast path cnn-5k ({T} workers x 1 thread)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, T, 1, per_call)),
            f"loop {tgt}, nn.Module (NCHW)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, False, target=tgt)),
            f"loop {tgt}, nn.Module (NCHW, 1 thread)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, 1, False, target=tgt)),
            f"loop {tgt}, nn.Module (bf16 autocast)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, False, bf16=True,
                                                                                         target=tgt)),
            f"convolutions only {tgt} ({T} workers x 1 thread)": (tasks, lambda ts, n: run_convs_only(ts, n, B, group, T, per_call,
                                                                                                     target=tgt)),
            f"convolutions only bf16 {tgt} ({T} workers x 1 thread)": (tasks, lambda ts, n: run_convs_only(
                ts, n, B, group, T, per_call, torch.bfloat16, target=tgt)),
        }  # fmt: skip
        convs = "convs" in want and not spec.head_only
        keep = ["generic" in want, "generic-bf16" in want, "vmap" in want, "fast" in want and tgt == "cnn-5k", "loop" in want,
                "loop1" in want, "loop-bf16" in want and not spec.head_only, convs, convs]
        runs = {name: r for (name, r), k in zip(runs.items(), keep) if k}
        extra = {
            f"batched ({T} workers x 1 thread)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, T, 1, per_call)),
            f"batched (1 worker x {T} threads)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, 1, T, per_call)),
            f"batched bf16 ({T} workers x 1 thread)": (tasks, lambda ts, n: run_batched(data, init, ts, n, B, group, T, 1, per_call,
                                                                                         torch.bfloat16)),
            "loop, nn.Module (NCHW)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, False)),
            "loop, nn.Module (channels-last)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, True)),
            "loop, nn.Module (NCHW, 1 thread)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, 1, False)),
            "loop, nn.Module (bf16 autocast)": (loop_tasks, lambda ts, n: run_loop(data, init, ts, n, B, T, False, bf16=True)),
        }  # fmt: skip
        groups = {"threads": [1], "bf16": [2], "loop-variants": [4, 5, 6]}
        for key, idx in groups.items():
            if key in want and tgt == "cnn-5k":
                runs |= {name: r for i, (name, r) in enumerate(extra.items()) if i in idx}
    # Rows run round-robin, --repeats rounds, and report their medians: on a small shared machine one
    # row's wall clock can swing by 30% between runs (the 2-thread loop most), and interleaving puts
    # every row under the same conditions.
    times = {name: [] for name in runs}
    for name, (ts, fn) in runs.items():
        # Warm-up: the same row for 2 steps (same shapes and threads). oneDNN builds its convolution
        # primitives per shape and thread count, about a second each, which a real build pays once.
        fn(ts, 2)
    for _ in range(args.repeats):
        for name, (ts, fn) in runs.items():
            cpu0 = _cpu_seconds()
            sec = fn(ts, S)
            times[name].append((sec, _cpu_seconds() - cpu0))
    rows = []
    for name, (ts, _) in runs.items():
        sec, cpu = median(t for t, _ in times[name]), median(c for _, c in times[name])
        work = len(ts) * per_model
        per_min = [round(len(ts) / t * 60, 1) for t, _ in times[name]]
        rows.append({"name": name, "models": len(ts), "seconds": round(sec, 2), "cpu_seconds": round(cpu, 2),
                     "models_per_minute": round(len(ts) / sec * 60, 1), "models_per_minute_range": [min(per_min), max(per_min)],
                     "gflops": round(work / sec / 1e9, 1), "gflop_per_cpu_second": round(work / cpu / 1e9, 1)})  # fmt: skip
    base = next((r for r in rows if r["name"].startswith("loop") and r["name"].endswith("nn.Module (NCHW)")), None)
    gen = next((r for r in rows if r["name"].startswith("generic")), None)
    for r in rows:  # per-model rates: equal work per model, whatever the model counts
        if base:
            r["speedup_vs_loop"] = round(r["models_per_minute"] / base["models_per_minute"], 2)
            r["share_of_matmul_peak"] = round(r["gflops"] / (mm_bf16 if "bf16" in r["name"] else mm), 2)
        if gen:
            r["speedup_vs_generic"] = round(r["models_per_minute"] / gen["models_per_minute"], 2)
    where = torch.cuda.get_device_name(dev) if gpu else f"cpu ({os.cpu_count()} cores)"
    result = {
        "machine": {"device": where, "cpu_count": os.cpu_count(), "threads": T, "torch": torch.__version__,
                    "platform": platform.platform(), "matmul_gflops": round(mm, 1), "matmul_gflops_bf16": round(mm_bf16, 1),
                    "matmul_size": args.matmul_size, "load_avg_1min": round(os.getloadavg()[0], 2)},
        "work": {"target": args.target, "models": args.models, "loop_models": len(loop_tasks), "steps": S, "batch": B, "k": args.k, "repeats": args.repeats,
                 "gflop_per_model": round(per_model / 1e9, 3)},
        "rows": rows,
    }  # fmt: skip
    if base:  # the fastest any trainer could go: every step at the matmul rate, same FLOPs as the loop
        result["ceiling_vs_loop"] = {"float32": round(mm / base["gflops"], 2), "bfloat16": round(mm_bf16 / base["gflops"], 2)}
    print(f"{args.target} fine-tuning on {where}: {args.models} models (loop: {len(loop_tasks)}) x {S} steps x batch {B} "
          f"(k={args.k}), {per_model / 1e9:.2f} GFLOP per model; {args.matmul_size}^2 matmul: fp32 {mm:.0f}, bf16 {mm_bf16:.0f} GFLOP/s; "
          f"load avg {os.getloadavg()[0]:.1f}; medians of {args.repeats} interleaved rounds")  # fmt: skip
    print(f"{'trainer':44s} {'models':>6s} {'seconds':>8s} {'models/min':>11s} {'(range)':>15s} {'GFLOP/s':>8s} {'vs loop':>8s} "
          f"{'cpu s':>7s} {'GFLOP/cpu-s':>12s}")
    for r in rows:
        lo, hi = r["models_per_minute_range"]
        print(f"{r['name']:44s} {r['models']:6d} {r['seconds']:8.2f} {r['models_per_minute']:11.1f} {f'{lo:.0f}-{hi:.0f}':>15s} "
              f"{r['gflops']:8.1f} {r.get('speedup_vs_loop', float('nan')):7.2f}x {r['cpu_seconds']:7.2f} {r['gflop_per_cpu_second']:12.1f}")
    if base:
        c = result["ceiling_vs_loop"]
        print(f"ceiling (a whole step at the matmul rate): {c['float32']:.2f}x the loop in float32, {c['bfloat16']:.2f}x in bf16")
    print(json.dumps(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
