"""`tina eval`: flags and key=value overrides onto EvalConfig, then the protocol; prints the headline."""

from __future__ import annotations

import sys
from pathlib import Path

from evaluation.config import SPLIT_TITLES, load_eval_config
from evaluation.report import results_markdown
from evaluation.run import evaluate
from tina.errors import TinaError
from tina.validate import ArgumentParser


def build_parser() -> ArgumentParser:
    from tina.diffusion import SAMPLERS

    ap = ArgumentParser(
        prog="tina eval", description="Evaluate a generator on a zoo: generated models vs oracle and baselines.",
        epilog="Example: tina eval configs/eval/fashion_mnist.yaml --checkpoint runs/fashion_mnist/bundle --tasks 50")
    ap.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                    help="an optional configs/eval/*.yaml, then EvalConfig overrides such as finetune.tasks=4")
    ap.add_argument("--checkpoint", help="generator folder (or 'default')")
    ap.add_argument("--zoo", help="the zoo the generator was trained on")
    ap.add_argument("--out", help="results folder")
    ap.add_argument("--seeds", type=int, help="generation seeds per task")
    ap.add_argument("--tasks", type=int, help="tasks per split (0 = all)")
    ap.add_argument("--steps", type=int, help="sampling steps")
    ap.add_argument("--sampler", choices=SAMPLERS)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--data-root", help="dataset location")
    ap.add_argument("--device")
    return ap


def main(argv: list[str] | None = None) -> int:
    # intermixed: `tina eval CONFIG --checkpoint B tasks=5` (overrides after flags) parses too
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    config = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(config) > 1:
        raise TinaError(f"give at most one config file, got {config}")
    flags = {"checkpoint": args.checkpoint, "zoo": args.zoo, "out": args.out, "seeds": args.seeds, "tasks": args.tasks,
             "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance, "data_root": args.data_root,
             "device": args.device}
    overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_eval_config(config[0] if config else None, overrides)
    r = evaluate(cfg)
    h = r["headline"]
    print(results_markdown(r).split("## Accuracy by k")[0].rstrip())
    print(f"\n{SPLIT_TITLES.get(h['split'], h['split'])}: generated {h['generated']:.3f}, "
          f"generated/oracle {h.get('ratio_to_oracle', float('nan')):.3f}, gain captured "
          + ("n/a (oracle − selection under the minimum)" if h.get("gain_captured") is None else f"{h['gain_captured']:.3f}"))
    print(f"results: {Path(cfg.out) / 'results.json'}, {Path(cfg.out) / 'results.md'}")
    return 0
