"""The `tina` command. Each subcommand parses arguments and calls one library function.

    tina generate "classify sneakers vs sandals"     prompt → model folder
    tina predict FOLDER img.png ...                   class and probability per image
    tina info [CHECKPOINT]                            what each shipped generator knows, and how well
    tina zoo build CONFIG key=value ...               build a zoo of personalized models
    tina train CONFIG key=value ...                   train a generator on a zoo
    tina eval ...                                     generated vs oracle and baselines
    tina demo                                         the Gradio demo

User mistakes (TinaError) print one line and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub; weights are local

from tina import __version__  # noqa: E402
from tina.errors import TinaError  # noqa: E402
from tina.validate import ArgumentParser, check_args, os_error_line, printable, quoted  # noqa: E402

log = logging.getLogger("tina")


def _slug(classes: list[str]) -> str:
    s = "-vs-".join(c.replace(" ", "_") for c in classes)
    return "".join(ch for ch in s if ch.isalnum() or ch in "-_")[:80] or "model"


def _parse_image_prompts(items: list[str], image_spec) -> dict:
    from tina.images import load_images

    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise TinaError(f"--image takes CLASS=path.png, got {item!r}")
        name, path = item.split("=", 1)
        out.setdefault(name.strip(), []).append(path)
    return {k: load_images(v, image_spec) for k, v in out.items()}


def cmd_generate(args) -> int:
    import torch

    from tina.export import save_generated
    from tina.routing import prompt_classes, route
    from tina.sample import Tina

    if args.prompt is None and not args.classes and not args.image:
        raise TinaError('give a prompt, e.g. tina generate "classify sneakers vs sandals", or --classes A B')
    if args.threads:
        torch.set_num_threads(args.threads)
    image_names = [item.split("=", 1)[0] for item in args.image if "=" in item]
    decision = route(prompt_classes(args.prompt, args.classes, image_names), args.checkpoint)
    print(f"checkpoint: {decision.reason}")
    tina = Tina.from_pretrained(decision.card.path, device=args.device)
    images = _parse_image_prompts(args.image, tina.bundle.image) if args.image else None
    task = tina.make_task(args.prompt, args.classes, images, imprint=args.imprint)
    a = task.assessment
    unknown = [m.name for m in a.unknown if task.classes.index(m.name) not in task.imprint]
    if args.imprint and not images:
        raise TinaError("--imprint builds head rows from image prompts: add --image CLASS=PATH (5 or more a class work best)")
    if unknown and not args.allow_unknown:
        raise TinaError(decision.refusal(unknown))
    print("classes (output order): " + ", ".join(f"{i}={printable(c)}" for i, c in enumerate(task.classes)))
    if a.resolved():
        print(f"known classes used: {a.resolved()}")
    print(a.summary())
    for w in task.warnings:
        print(f"warning: {printable(w)}", file=sys.stderr)
    model = tina.generate_tasks([task], seed=args.seed, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                                strength=args.strength)[0]
    model.tina_info |= {"routing": decision.info(), "allowed_unknown": bool(unknown)}
    out = Path(args.output) if args.output else Path("generated") / _slug(task.classes)
    save_generated(model, out, formats=tuple(args.format), backbone=args.backbone)
    n = sum(p.numel() for p in model.parameters())
    print(f"generated a {len(task.classes)}-class {tina.bundle.target} ({n:,} parameters) in {model.tina_info['seconds']:.2f}s "
          f"-> {printable(out)}")
    im = tina.bundle.image
    code = (f"import torch; m = torch.export.load({str(out / 'model.pt2')!r}).module(); "
            f"print(m(torch.rand(1, {im.channels}, {im.size}, {im.size})))")
    print("use it:")
    print(f"  tina predict {printable(quoted(out))} image.png")
    if (out / "model.pt2").is_file():
        print(f"  python -c {printable(quoted(code))}")
    return 0


def cmd_predict(args) -> int:
    import torch

    from tina.export import load_generated
    from tina.images import load_images

    net = load_generated(args.model)
    x = load_images(args.images, net.image)
    with torch.no_grad():
        probs = net(x).softmax(-1)
    for path, p in zip(args.images, probs):
        i = int(p.argmax())
        names = [printable(c) for c in net.classes]
        ranked = ", ".join(f"{names[j]} {p[j]:.3f}" for j in p.argsort(descending=True)[: args.top].tolist())
        print(f"{printable(path)}: {names[i]} ({p[i]:.3f})   [{ranked}]")
    return 0


def cmd_info(args) -> int:
    from tina.bundle import load_bundle
    from tina.routing import read_card, shipped_cards
    from tina.registry import resolve_checkpoint

    if args.checkpoint is None:  # every shipped checkpoint: what it knows and how well
        from tina.registry import ALIASES

        for card in shipped_cards():
            d = card.describe()
            alias = [a for a, t in ALIASES.items() if t == card.name]
            print(f"{card.name}{' (alias: ' + ', '.join(alias) + ')' if alias else ''}: {d['domain']}, "
                  f"up to {card.k_max} classes per model")
            print(f"  vocabulary ({len(card.vocab)}): {', '.join(card.vocab)}")
            print(f"  quality: {d['quality']}")
            print(f"  classes under similarity {card.threshold:.2f} to this vocabulary are refused (--allow-unknown overrides)")
        print("details of one: tina info NAME")
        return 0
    path = resolve_checkpoint(args.checkpoint)
    b = load_bundle(path)
    info = {"path": str(path), "target": b.target, "dataset": b.dataset, "text_encoder": b.text_encoder,
            "layout_fingerprint": b.fingerprint, "k_max": b.k_max, "vocabulary": b.vocab,
            "generator_parameters": sum(p.numel() for p in b.dit.parameters()), "image_prompts": bool(b.projector),
            "generates": "residual from classifier selection" if b.anchor is not None else "whole weights",
            **read_card(path).describe(), **b.meta}
    print(json.dumps(info, indent=2))
    return 0


def cmd_zoo(args) -> int:
    # The CLI is the one place that reaches into zoo_builder (the library `tina` never does).
    from zoo_builder.build import main as zoo_main

    return zoo_main(args.rest)


def cmd_train(args) -> int:
    from tina.training.train import main as train_main

    return train_main(args.rest)


def cmd_eval(args) -> int:
    from evaluation.cli import main as eval_main

    return eval_main(args.rest)


def cmd_demo(args) -> int:
    from serve.app import main as demo_main

    return demo_main(args.rest)


DELEGATED = ("zoo", "train", "eval", "demo")


def build_parser() -> argparse.ArgumentParser:
    from tina.diffusion import SAMPLERS

    ap = ArgumentParser(prog="tina", description="Text-to-model: type a task, get a working classifier.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    ap.add_argument("--version", action="version", version=f"tina {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a classifier from a prompt")
    g.add_argument("prompt", nargs="?", help='e.g. "classify sneakers vs sandals"')
    g.add_argument("--classes", nargs="+", metavar="CLASS", help="explicit class names, in output order")
    g.add_argument("--image", action="append", default=[], metavar="CLASS=PATH",
                   help="image prompt for a class (repeat for several images or classes)")
    g.add_argument("--imprint", action="store_true",
                   help="also build the --image classes' head rows from their images' features (few-shot: for classes "
                        "the checkpoint never saw; such classes are then not refused as unknown)")
    g.add_argument("--checkpoint", default=None,
                   help="generator folder or shipped name (default: route to the shipped checkpoint that knows the classes)")
    g.add_argument("--allow-unknown", action="store_true",
                   help="generate even when a class is too far from every known class (marked in config.json)")
    g.add_argument("-o", "--output", help="model folder to write (default generated/<classes>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--sampler", choices=SAMPLERS, default=None)
    g.add_argument("--strength", type=float, default=None,
                   help="with --steps > 1: start from the one-step mean noised to this fraction of the schedule "
                   "(lower keeps samples nearer the mean; 1 = from pure noise; default: the checkpoint's)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--format", nargs="+", default=["pt2"], choices=["pt2", "onnx"], help="export formats")
    g.add_argument("--backbone", metavar="FILE", help="head-on-backbone targets: keep the frozen backbone in this shared "
                   "file (written once, reused by every folder that names it) and only the head in the folder (no model.pt2)")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: one small model samples fastest single-threaded; 0 = torch's default)")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("predict", help="classify images with a generated model folder")
    p.add_argument("model", help="folder written by tina generate")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=int, default=3)
    p.set_defaults(func=cmd_predict)

    i = sub.add_parser("info", help="describe a generator checkpoint")
    i.add_argument("checkpoint", nargs="?", default=None, help="a shipped name or folder (default: list every shipped one)")
    i.set_defaults(func=cmd_info)

    for name, func, help_ in [
        ("zoo", cmd_zoo, "build a zoo: tina zoo build CONFIG key=value ..."),
        ("train", cmd_train, "train a generator: tina train CONFIG key=value ..."),
        ("eval", cmd_eval, "evaluate a generator against the oracle and baselines"),
        ("demo", cmd_demo, "start the Gradio demo"),
    ]:
        s = sub.add_parser(name, help=help_, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=func)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    flags = [a for a in argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]]
    rest = argv[len(flags):]
    if rest and rest[0] in DELEGATED:  # these parse their own arguments (argparse REMAINDER drops --help)
        args = parser.parse_args([*flags, rest[0]])
        args.rest = rest[1:]
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
        return args.func(args) or 0
    except TinaError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tina info | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # a full disk, a read-only or forbidden folder: the system's one line
        line = os_error_line(e)
        if line is None:
            raise
        print(f"error: {printable(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
