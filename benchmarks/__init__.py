"""Benchmarks: how fast Tina builds zoos, trains, and turns a prompt into a model. One entry point:

    python -m benchmarks [--quick] [--json PATH] [--checkpoint B] [--zoo Z] [--only zoo,train,generation,scaling]

One module per measurement, each with `run(...) -> dict` and its own `python -m benchmarks.NAME`:
  zoo_throughput.py    zoo build: batched fine-tuning vs one model at a time (the zoo engineer's)
  train_throughput.py  generator training: samples/s (CPU and GPU), tokens/s and model FLOPs utilisation (GPU)
  generation.py        prompt → model latency, warm (in process) and cold (`tina generate` subprocess),
                       beside the time to fine-tune the same task to the same accuracy; peak memory
  scaling.py           accuracy vs zoo size and vs generator size (plots + JSON)
  conv_layers.py       each cnn-33k convolution in the grouped layout (and rewrites of the first), fwd + bwd

The helpers below are shared: timing, peak memory and the printed table.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children) in MiB; ru_maxrss is KiB on Linux."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    kb = resource.getrusage(who).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def cuda_peak_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    """A two-column table: metric | value."""
    width = max([len(r[0]) for r in rows] + [6])
    print(f"\n{title}")
    print(f"  {'metric'.ljust(width)}  value")
    print(f"  {'-' * width}  {'-' * 20}")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {fmt(value)}")
