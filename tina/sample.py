"""Prompt → text embeddings → parameter tokens → a standalone classifier.

`Tina` is the Python API:

    from tina import Tina
    t = Tina.from_pretrained("default")
    model = t.generate("classify sneakers vs sandals")      # an nn.Module with .classes
    models = t.generate_many(["cats vs dogs", "coat, shirt or dress"])   # one batched reverse process

In-vocabulary class names use the embeddings cached in the checkpoint, so the text encoder is only
loaded for words the checkpoint has not seen. Each call builds its own scheduler and generator
state, so one `Tina` can serve concurrent requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tina.bundle import Bundle, load_bundle
from tina.diffusion import initial_noise, make_scheduler, one_step_x0, resolve_sampling, sample_tokens
from tina.errors import TinaError
from tina.expected import Assessment, assess
from tina.imprint import IMPRINT_WARNING, imprint
from tina.prompts import parse_prompt
from tina.projector import embed_class_images
from tina.registry import AUTO, resolve_checkpoint  # noqa: F401 - resolve_checkpoint is part of this module's API
from tina.targets import TargetNet
from tina.weights import build_model, tokens_to_flat

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One generation request after parsing."""

    classes: list[str]
    prompt: str
    cond: torch.Tensor  # (k, E)
    warnings: list[str] = field(default_factory=list)
    assessment: Assessment | None = None  # matches, expected accuracy (tina/expected.py)
    # Classes whose head rows are imprinted from their example images (tina/imprint.py): {index: (n, C, H, W)}
    imprint: dict[int, torch.Tensor] = field(default_factory=dict)


class Tina:
    """A loaded generator, ready to turn prompts into models."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu"):
        self.bundle = bundle
        self.device = torch.device(device)
        self._vocab_index = {n.lower(): i for i, n in enumerate(bundle.vocab)}
        self._encoder = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", device: str | torch.device = "cpu",
                        prompt: str | list[str] | None = None) -> "Tina":
        """A shipped name ('fashion-mnist', alias 'default'), a generator folder, or "auto" with a
        `prompt` (text or class names): the shipped checkpoint that knows its classes best (tina/routing.py)."""
        device = _check_device(device)
        if str(name_or_path) == AUTO:
            from tina.routing import prompt_classes, route

            if prompt is None:
                raise TinaError('Tina.from_pretrained("auto") routes by the prompt: pass prompt="cats vs dogs"')
            classes = prompt_classes(classes=prompt) if isinstance(prompt, list) else prompt_classes(prompt)
            name_or_path = route(classes).card.path
        tina = cls(load_bundle(resolve_checkpoint(name_or_path), device=device), device)
        # Import the default sampler's scheduler now (diffusers takes 1-2 s to import), so the first
        # generation's reported time is the generation's; the one-step default needs none (diffusion.py).
        d = tina.bundle.meta.get("sampling", {})
        sampler, steps = d.get("sampler", "ddim"), d.get("steps", 25)
        if not one_step_x0(tina.bundle.scheduler_config, sampler, steps):
            make_scheduler(tina.bundle.scheduler_config, sampler)
        return tina

    # ---- text ---------------------------------------------------------------------------------

    @property
    def encoder(self):
        if self._encoder is None:
            from tina.text import get_text_encoder

            self._encoder = get_text_encoder(self.bundle.text_encoder)
        return self._encoder

    def embed_classes(self, classes: list[str]) -> torch.Tensor:
        """(k, E) embeddings, cached ones for known names; the encoder runs only for the others."""
        emb = [None] * len(classes)
        unknown = [i for i, c in enumerate(classes) if c.lower() not in self._vocab_index]
        for i, c in enumerate(classes):
            if i not in unknown:
                emb[i] = self.bundle.vocab_emb[self._vocab_index[c.lower()]]
        if unknown:
            new = self.encoder.encode([classes[i] for i in unknown]).float().cpu()
            for j, i in enumerate(unknown):
                emb[i] = new[j]
        return torch.stack(emb)  # (k, E)

    def assess(self, classes: list[str], cond: torch.Tensor, image_classes: set[str] = frozenset()) -> Assessment:
        """What this checkpoint knows about the classes: matches, expected accuracy, warnings."""
        keys = self.bundle.anchor.keys if self.bundle.anchor is not None else self.bundle.vocab_emb
        return assess(classes, cond, self.bundle.vocab, keys, self.bundle.quality, image_classes)

    def embed_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Mean embedding (E,) of one class's example images, (n, C, H, W) floats in [0, 1]."""
        return embed_class_images(self, images)

    # ---- tasks --------------------------------------------------------------------------------

    def make_task(self, prompt: str | None = None, classes: list[str] | None = None, images: dict | None = None,
                  imprint: bool = False) -> Task:
        """Parse and embed one request. `images` {class: (n, C, H, W)} prompt those classes by example;
        with `imprint` their head rows are also built from the examples' features (tina/imprint.py)."""
        from tina.prompts import normalize_class

        if classes and prompt is not None:
            raise TinaError("give a prompt or a list of classes, not both")
        if classes:
            classes = [normalize_class(c) for c in classes]
            _check_classes(classes)
        elif prompt is not None:
            classes = parse_prompt(prompt)
        elif images:
            classes = [normalize_class(c) for c in images]
            _check_classes(classes)
        else:
            raise TinaError("give a prompt, --classes or image prompts")
        if len(classes) > self.bundle.k_max:
            raise TinaError(f"{len(classes)} classes asked for, but this checkpoint supports at most {self.bundle.k_max}")
        cond = self.embed_classes(classes)
        image_classes = set()
        for name, imgs in (images or {}).items():
            name = normalize_class(name)
            if name not in classes:
                raise TinaError(f"image prompt for {name!r}, which is not one of the classes {classes}")
            if imprint and not self.bundle.projector:
                continue  # no projector: the class is conditioned on its name, its row imprinted below
            cond[classes.index(name)] = self.embed_images(imgs)
            image_classes.add(name)
        a = self.assess(classes, cond, image_classes)
        rows = {classes.index(normalize_class(n)): imgs for n, imgs in (images or {}).items()} if imprint else {}
        warnings = list(a.warnings)
        if rows:
            warnings.append(IMPRINT_WARNING.format(classes=", ".join(classes[i] for i in sorted(rows))))
        return Task(classes, prompt if prompt is not None else " vs ".join(classes), cond, warnings, a, rows)

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate_tasks(
        self, tasks: list[Task], seed: int = 0, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
        strength: float | None = None,
    ) -> list[TargetNet]:
        """All tasks in one batched reverse process (tasks of different k are padded and masked)."""
        settings = resolve_sampling(self.bundle.meta.get("sampling", {}), seed, steps, guidance, sampler, strength)
        seed, steps, guidance, sampler = settings.seed, settings.steps, settings.guidance, settings.sampler
        t0 = time.perf_counter()
        K = max(len(t.classes) for t in tasks)
        E = tasks[0].cond.shape[-1]
        cond = torch.zeros(len(tasks), K, E)
        mask = torch.zeros(len(tasks), K, dtype=torch.bool)
        for i, t in enumerate(tasks):
            cond[i, : len(t.classes)], mask[i, : len(t.classes)] = t.cond, True
        noise = initial_noise(seed, [self.bundle.dit.num_tokens(len(t.classes)) for t in tasks], self.bundle.layout.token_size)
        tokens = sample_tokens(
            self.bundle.dit, self.bundle.scheduler_config, cond.to(self.device), None if bool(mask.all()) else mask.to(self.device),
            sampler=sampler, steps=steps, guidance=guidance, noise=noise.to(self.device), strength=settings.strength,
        ).float().cpu()
        models = []
        layout = self.bundle.layout
        for i, t in enumerate(tasks):
            flat = tokens_to_flat(layout, tokens[i], t.cond, self.bundle.anchor)  # (P,)
            net = build_model(self.bundle, flat, t.classes)
            imprint(net, t.imprint)
            net.tina_info = {
                "prompt": t.prompt, "classes": t.classes, "seed": seed, "steps": steps, "guidance": guidance,
                "sampler": sampler, "strength": settings.strength, "warnings": t.warnings, "imprinted": [t.classes[c] for c in sorted(t.imprint)], "generator_fingerprint": layout.fingerprint,
                "checkpoint": str(self.bundle.path) if self.bundle.path else None,
                **(t.assessment.info() if t.assessment is not None else {}),
                "seconds": time.perf_counter() - t0,
            }
            models.append(net)
        return models

    def generate(self, prompt: str | None = None, *, classes: list[str] | None = None, images: dict | None = None,
                 seed: int = 0, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 strength: float | None = None, imprint: bool = False) -> TargetNet:
        """One model: `prompt` ("classify X vs Y") or explicit `classes`; `images` {class: (n,C,H,W)},
        with `imprint` also building those classes' head rows from the images (tina/imprint.py)."""
        task = self.make_task(prompt, classes, images, imprint)
        return self.generate_tasks([task], seed=seed, steps=steps, guidance=guidance, sampler=sampler, strength=strength)[0]

    def generate_many(self, prompts: list[str | list[str]], seed: int = 0, **kw) -> list[TargetNet]:
        """Many models in one batched call; each item is a prompt or a list of class names."""
        tasks = [self.make_task(classes=p) if isinstance(p, list) else self.make_task(p) for p in prompts]
        return self.generate_tasks(tasks, seed=seed, **kw)


def _check_classes(classes: list[str]) -> None:
    if len(classes) < 2:
        raise TinaError(f"a classifier needs at least two classes, got {classes}")
    seen = set()
    for c in classes:
        if not c:
            raise TinaError("empty class name")
        if c in seen:
            raise TinaError(f"class {c!r} is given twice")
        seen.add(c)


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TinaError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TinaError("--device cuda was asked for, but CUDA is not available here")
    return dev
