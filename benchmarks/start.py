"""Cold start: `tina generate` (process start -> model folder written) against `python -c "import torch"`.

    python -m benchmarks.start [--rounds 5] [--json docs/results/start.json] [--md docs/results/start.md]

Each round runs every command once as a fresh process, in an order that rotates from round to round
(interleaved, so a machine that gets busier or quieter during the run shifts all commands alike).
Per command: wall time from spawn to exit and the child's peak resident memory (ru_maxrss from
os.wait4, so only that child is counted); medians over rounds, and the spread (min-max) beside
them, because a shared machine makes single runs noisy. The goal (issue 19): generate <= 1.3x the
time and <= 1.15x the peak memory of importing torch.

Commands (the page cache is warm after the first round for all of them alike):
  import torch          python -c "import torch"
  generate              tina generate PROMPT --output DIR: the default (one DDIM step without diffusers,
                        model.pt2 from the export cache, which the first round fills)
  generate, new arch    the same with an empty $TINA_CACHE each time: the first model of an architecture
                        on a machine pays torch.export (~1.5 s on an idle CPU)
  import tina           python -c "from tina import Tina" (with --only: the library's own import cost)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "classify sneakers vs sandals"
TIME_GOAL, RSS_GOAL = 1.3, 1.15


def commands(tmp: Path) -> dict[str, tuple[list[str], dict]]:
    """name -> (argv, extra environment); generate's TINA_CACHE lives in `tmp`, so the run starts empty."""
    cli = [sys.executable, "-m", "tina.cli", "generate", PROMPT, "--output", str(tmp / "model")]
    return {
        "import torch": ([sys.executable, "-c", "import torch"], {}),
        "generate": (cli, {"TINA_CACHE": str(tmp / "cache")}),
        "generate, new arch": (cli, {"TINA_CACHE": "NEW"}),  # a fresh empty folder per run
        "import tina": ([sys.executable, "-c", "from tina import Tina"], {}),
    }


DEFAULT = ("import torch", "generate", "generate, new arch")


def run_once(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[-500:]}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "runs": [round(x, 3) for x in xs]}


def run(rounds: int = 5, only: list[str] | None = None) -> dict:
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="tina-start-") as tmp:
        tmp = Path(tmp)
        cmds = commands(tmp)
        names = ["import torch", *[n for n in (only or DEFAULT) if n != "import torch"]]
        seconds = {n: [] for n in names}
        rss = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for n in order:
                argv, extra = cmds[n]
                env = {**base_env, **extra}
                if env.get("TINA_CACHE") == "NEW":
                    env["TINA_CACHE"] = tempfile.mkdtemp(dir=tmp)
                shutil.rmtree(tmp / "model", ignore_errors=True)  # every generate writes a fresh folder
                s, m = run_once(argv, env)
                if n.startswith("generate") and not (tmp / "model" / "model.pt2").is_file():
                    raise RuntimeError(f"{n} wrote no model folder")
                seconds[n].append(s)
                rss[n].append(m)
                print(f"round {r + 1}/{rounds} {n}: {s:.2f} s, {m:.0f} MiB", file=sys.stderr, flush=True)
    base_t, base_m = statistics.median(seconds["import torch"]), statistics.median(rss["import torch"])
    rows = {n: {"seconds": summary(seconds[n]), "peak_rss_mib": summary(rss[n]),
                "time_ratio": round(statistics.median(seconds[n]) / base_t, 3),
                "rss_ratio": round(statistics.median(rss[n]) / base_m, 3)} for n in names}
    g = rows.get("generate")
    return {
        "benchmark": "cold start", "prompt": PROMPT, "rounds": rounds, "command": "python -m benchmarks.start",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "goals": {"time_ratio": TIME_GOAL, "rss_ratio": RSS_GOAL},
        "met": None if g is None else {"time": g["time_ratio"] <= TIME_GOAL, "rss": g["rss_ratio"] <= RSS_GOAL},
        "rows": rows,
    }


def markdown(r: dict) -> str:
    lines = [f"Cold start, `{r['command']}` ({r['rounds']} interleaved rounds, medians; min-max in brackets; "
             f"load average at the end {r['machine']['load_average_at_end']} on {r['machine']['cpus']} CPUs)", "",
             "| command | wall time (s) | × import torch | peak RSS (MiB) | × import torch |", "|---|---|---|---|---|"]
    for n, row in r["rows"].items():
        s, m = row["seconds"], row["peak_rss_mib"]
        lines.append(f"| {n} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | {row['time_ratio']:.2f} | "
                     f"{m['median']:.0f} [{m['min']:.0f}-{m['max']:.0f}] | {row['rss_ratio']:.2f} |")
    if r["met"] is not None:
        lines += ["", f"Goals: time ≤ {TIME_GOAL}× ({'met' if r['met']['time'] else 'NOT met'}), "
                      f"peak RSS ≤ {RSS_GOAL}× ({'met' if r['met']['rss'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.start", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="+", default=None, choices=list(commands(Path("."))),
                    help=f"commands to run beside import torch (default: {', '.join(DEFAULT[1:])})")
    ap.add_argument("--json", type=Path, default=None, help="write the result here (e.g. docs/results/start.json)")
    ap.add_argument("--md", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    r = run(args.rounds, args.only)
    table = markdown(r)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    if args.md:
        args.md.write_text(table)
    return r


if __name__ == "__main__":
    main()
