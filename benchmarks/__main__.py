"""`python -m benchmarks [--quick] [--json PATH]`: every benchmark, one table, one JSON file.

    python -m benchmarks --quick                       minutes on a 2-core CPU
    python -m benchmarks --json outputs/benchmarks.json --checkpoint runs/fashion_mnist/bundle --zoo zoos/fashion_mnist
    python -m benchmarks --only scaling --quick        the scaling curves too (long; see benchmarks/scaling.py)

Each part runs on its own: a part that fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from benchmarks import fmt, peak_rss_mb, print_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("benchmarks")
PARTS = ("zoo", "train", "generation", "scaling")
DEFAULT_PARTS = ("zoo", "train", "generation")  # scaling trains several generators: ask for it with --only


def zoo_throughput(quick: bool) -> dict:
    """benchmarks/zoo_throughput.py (the zoo engineer's): its main(argv) returns the result dict.

    --quick: 12 models x 20 steps instead of its default 48 x 50 (the same comparison, less work)."""
    try:
        mod = importlib.import_module("benchmarks.zoo_throughput")
    except ModuleNotFoundError as e:
        if e.name != "benchmarks.zoo_throughput":
            raise
        return {"skipped": "benchmarks/zoo_throughput.py does not exist yet"}
    argv = ["--models", "12", "--steps", "20", "--repeats", "1"] if quick else []
    try:
        r = mod.main(argv)
    except SystemExit as e:  # its argparse rejected the arguments
        raise RuntimeError(f"benchmarks.zoo_throughput.main({argv}) exited with {e.code}") from None
    return r if isinstance(r, dict) else {"skipped": "benchmarks.zoo_throughput.main returned no result dict"}


def zoo_rows(r: dict) -> list[tuple[str, object]]:
    if "skipped" in r:
        return [("skipped", r["skipped"])]
    if "rows" not in r:
        return _flat_rows(r)
    w = r.get("work", {})
    out = [("work", f"{w.get('models')} models x {w.get('steps')} steps x batch {w.get('batch')} (k={w.get('k')})")]
    for row in r["rows"]:
        out.append((f"{row['name']}: models/min", f"{row['models_per_minute']}  ({row['speedup_vs_loop']}x vs loop, "
                                                   f"{row['gflop_per_cpu_second']} GFLOP/cpu-s)"))
    return out


def _flat_rows(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Rows for a result whose shape this file does not know (the zoo benchmark): scalars, dotted names."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat_rows(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((f"{prefix}{k}", v))
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v):
            out.append((f"{prefix}{k}", v))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="Tina's benchmarks: one table, one JSON file.")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller settings (minutes on a CPU)")
    ap.add_argument("--json", default="outputs/benchmarks.json", help="where to write the results")
    ap.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})")
    ap.add_argument("--checkpoint", help="generator folder for the generation benchmark (default: 'default', else an untrained one)")
    ap.add_argument("--zoo", help="zoo for the fine-tune comparison, the data pipeline and scaling")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available for training)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parts = args.only.split(",") if args.only else list(DEFAULT_PARTS)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; choose from {PARTS}")

    import torch

    results = {"format": "tina-bench/1", "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                           "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    threads0 = torch.get_num_threads()
    for part in parts:
        torch.set_num_threads(threads0)  # a part may change it (the zoo benchmark does); each starts from the default
        t0 = time.perf_counter()
        try:
            if part == "zoo":
                r = zoo_throughput(args.quick)
                rows = zoo_rows(r)
            elif part == "train":
                from benchmarks import train_throughput

                r = train_throughput.run(args.quick, zoo=args.zoo, device=args.device)
                rows = train_throughput.rows(r)
            elif part == "generation":
                from benchmarks import generation

                r = generation.run(args.quick, args.checkpoint, args.zoo, device=args.device or "cpu")
                rows = generation.rows(r) + [("note", n) for n in r["notes"]]
            else:
                from benchmarks import scaling

                r = scaling.run(scaling.ScalingConfig.preset(args.quick, zoo=args.zoo))
                rows = scaling.rows(r)
        except Exception as e:  # a broken part must not hide the others
            log.error("benchmark %s failed:\n%s", part, traceback.format_exc())
            r, rows = {"error": f"{type(e).__name__}: {e}"}, [("error", f"{type(e).__name__}: {e}")]
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[part] = r
        print_table(f"{part} ({r['seconds']} s)", rows)
    results["peak_rss_mb"] = peak_rss_mb()
    results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    la = results["machine"]["load_average"]
    print(f"\nload average {fmt(list(la)) if la else '?'} on {os.cpu_count()} CPUs (timings are only as quiet as the machine)")
    print(f"results: {path}")
    return 1 if any("error" in results[p] for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
