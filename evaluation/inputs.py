"""What an evaluation reads: the zoo, the checkpoint and the dataset, each checked with a TinaError that says
how to get what is missing."""

from __future__ import annotations

from pathlib import Path

from evaluation.config import EvalConfig
from tina.errors import TinaError


def _check_setting(cfg: EvalConfig):
    """A setting with `expect` (a paper setting) lists every missing piece at once; returns the dataset if loaded.

    When the zoo exists, its own record (dataset root and options, text encoder) is what gets checked."""
    from tina.training.data import read_manifest
    from tina.training.datasets import load_dataset
    from tina.registry import resolve_checkpoint
    from tina.text import get_text_encoder

    ex, missing, dataset = cfg.expect, [], None
    zoo_cfg, train_cfg = ex.zoo_config or "configs/zoo/<name>.yaml", ex.train_config or "configs/train/<name>.yaml"
    man = read_manifest(Path(cfg.zoo)) if (Path(cfg.zoo) / "manifest.json").is_file() else None
    if ex.dataset is not None:
        try:
            dataset = load_dataset(man["dataset"] if man else ex.dataset, cfg.data_root)
        except TinaError as e:
            missing.append(f"dataset {ex.dataset}: {e}")
    if ex.text_encoder is not None:
        try:
            get_text_encoder(man["text_encoder"] if man else ex.text_encoder)  # resolves the weights file without loading it
        except TinaError as e:
            missing.append(f"text encoder: {e}")
    if man is None:
        what = ", ".join(f"{n} {v}" for n, v in (("dataset", ex.dataset), ("target", ex.target),
                                                  ("text_encoder", ex.text_encoder), ("k", ex.k)) if v is not None)
        missing.append(f"zoo {cfg.zoo!r} does not exist: build one ({what}) with `tina zoo build {zoo_cfg} out={cfg.zoo}`")
    try:
        resolve_checkpoint(cfg.checkpoint)
    except TinaError:
        missing.append(f"checkpoint {cfg.checkpoint!r} does not exist: train one on the zoo with "
                       f"`tina train {train_cfg} zoo={cfg.zoo} out=RUN` and pass --checkpoint RUN/bundle")
    if missing:
        raise TinaError("this evaluation setting cannot run here:\n  - " + "\n  - ".join(missing))
    return dataset


def resolve_inputs(cfg: EvalConfig):
    """Zoo manifest, Tina, dataset; every missing piece is a TinaError that says how to get it."""
    from tina.training.data import read_manifest
    from tina.training.datasets import load_dataset
    from tina.registry import resolve_checkpoint
    from tina.sample import Tina
    from tina.text import encoder_satisfies

    checked = ("dataset", "target", "text_encoder", "k", "min_tasks")
    dataset = _check_setting(cfg) if any(getattr(cfg.expect, n) not in (None, 0) for n in checked) else None
    zoo = Path(cfg.zoo)
    if not (zoo / "manifest.json").is_file():
        # The baselines (retrieval, head composition, the hypernetwork, memorization) and the tasks' test sets
        # all come from the zoo, which is built, not shipped: say exactly what to build.
        build = f"tina zoo build {cfg.expect.zoo_config or 'configs/zoo/<name>.yaml'} out={zoo}"
        raise TinaError(f"no zoo at {str(zoo)!r} (the evaluation's tasks and baselines come from it): build it first with "
                        f"`{build}`, or pass --zoo ZOO")
    man = read_manifest(zoo)
    ex = cfg.expect
    for what, want, have in (("dataset", ex.dataset, man["dataset"]["name"]), ("target", ex.target, man["target"])):
        if want is not None and want != have:
            raise TinaError(f"zoo {zoo} was built with {what} {have!r}, but this evaluation setting needs {want!r}")
    # A local checkpoint of the named architecture stands in for a tag's weights (open_clip:ViT-B-32-quickgelu/openai).
    if ex.text_encoder is not None and not encoder_satisfies(man["text_encoder"], ex.text_encoder):
        raise TinaError(f"zoo {zoo} was built with text encoder {man['text_encoder']!r}, but this evaluation setting "
                        f"needs {ex.text_encoder!r} (or a local checkpoint of that architecture)")
    try:
        resolve_checkpoint(cfg.checkpoint)
    except TinaError as e:
        raise TinaError(f"{e}; train a generator on this zoo with `tina train configs/train/<name>.yaml zoo={zoo}` "
                        "(its bundle is RUN/bundle) and pass --checkpoint RUN/bundle") from None
    tina = Tina.from_pretrained(cfg.checkpoint, device=cfg.device)
    b = tina.bundle
    # Flat vectors do not depend on the token size (a generator may re-tokenize its zoo): compare the rest.
    if {**b.layout.to_dict(), "token_size": 0} != {**man["layout"], "token_size": 0}:
        raise TinaError(f"checkpoint {cfg.checkpoint} (layout {b.fingerprint}) generates other parameter vectors than zoo "
                        f"{zoo} holds (layout {man['layout_fingerprint']}): evaluate a generator on the zoo it was trained on")
    if b.text_encoder != man["text_encoder"]:
        raise TinaError(f"checkpoint {cfg.checkpoint} uses text encoder {b.text_encoder!r}, zoo {zoo} {man['text_encoder']!r}")
    if dataset is None or dataset.name != man["dataset"]["name"]:
        dataset = load_dataset(man["dataset"], cfg.data_root)  # the zoo's record: root and options
    return zoo, man, tina, dataset


def encoder_or_none(tina, notes: list[str]):
    try:
        return tina.encoder.load()
    except TinaError as e:
        notes.append(f"text encoder unavailable ({e}); random text uses random unit vectors, "
                     "held-out templates and paraphrases are skipped")
        return None


def image_prompt_ok(tina, notes: list[str]) -> bool:
    b = tina.bundle
    if b.projector:
        return True
    try:
        if getattr(tina.encoder, "has_image_tower", False):
            return True
    except TinaError:
        pass
    notes.append(f"image prompts skipped: the checkpoint has no image projector and its encoder {b.text_encoder!r} no "
                 "image tower (add a projector with `python -m tina.training.projector CHECKPOINT`)")
    return False




def scan_zoo(zoo: str | Path, split: str, consumers: list, chunk: int = 256) -> int:
    """Stream one split of the zoo once through every consumer (each has .add(models)), `chunk` models at a
    time, so no more than a chunk is in memory; returns how many models were streamed."""
    from tina.training.data import iter_split

    n, buf = 0, []
    for m in iter_split(zoo, split):
        buf.append(m)
        if len(buf) == chunk:
            for c in consumers:
                c.add(buf)
            n, buf = n + len(buf), []
    if buf:
        for c in consumers:
            c.add(buf)
    return n + len(buf)
