"""The demo's service: generators, routing, images and answers, with no Gradio (serve/app.py is the page).

`Service` loads the generator it was started with, and, when routing (tina/routing.py) picks another
shipped checkpoint for a prompt, that one too (once, under a lock, then kept). Its operations raise
TinaError for user mistakes; serve/app.py turns them into messages. Every generated model carries
`.tina_info` (routing decision, expected accuracy, warnings) and `.tina_bundle` (the generator it came
from, whose image spec its inputs are read with).
"""

from __future__ import annotations

import html
import logging
import secrets
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tina.errors import TinaError

log = logging.getLogger(__name__)

EXAMPLES = {  # prompt examples per shipped checkpoint's dataset (others get some of their vocabulary)
    "fashion-mnist": [
        "classify sneakers vs sandals",
        "t-shirt, pullover, coat or shirt",
        "an open shoe held on by straps vs a warm winter coat",
        "tell trousers from dresses",
        "bags, sneakers and ankle boots",
    ],
    "clipart": [
        "classify trees vs flowers vs fruit",
        "road signs, safety signs or arrows",
        "mammals, buildings, musical instruments, maps and flags",
        "a drink or a dessert",
        "app icons, file icons, folder icons, toolbar icons and device icons",
    ],
}


def examples_for(dataset: str, vocab: list[str]) -> list[str]:
    """The prompt examples shown for a checkpoint: its dataset's, else three of its class names."""
    return EXAMPLES.get(dataset) or [", ".join(vocab[:3])]
IMAGE_PROMPT_ROWS = 4  # class name + images rows in the advanced accordion
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per image file; launch() also refuses larger uploads
MAX_PROMPT_IMAGES = 16  # images per class prompt
MAX_STEPS = 200  # the sliders stop at 100; API callers are clamped here
MAX_GUIDANCE = 20.0
NUM_SAMPLES = 10  # test images shown in the gallery
STATE_TTL_S = 3 * 3600  # a session's generated model is dropped after this long


@dataclass
class Sample:
    """One test image of the checkpoint's dataset."""

    index: int  # position in the test split
    image: np.ndarray  # uint8 (H, W) or (H, W, C), as a browser shows it
    label: str  # true class name


def _load_dataset(name):
    """The checkpoint's dataset (a name or the zoo's record of it) via tina.training.datasets (imported late: only the sample gallery needs it)."""
    try:
        from tina.training.datasets import load_dataset
    except ImportError as e:
        raise TinaError(f"sample images need tina.training.datasets, which is not available here ({e})") from None
    return load_dataset(name)


class Service:
    """The loaded generators and the demo's operations; shared by every session. Only two things change after
    start, each under its lock: a generator routing picks is added, the sample dataset is read once.

    `generate`, `answer`, `predict`, `export_zip` and `samples` raise TinaError for user mistakes; serve/app.py's
    `Demo` adds the page's `on_*` handlers, which never raise.
    """

    def __init__(self, tina, dataset_loader: Callable[[str], Any] | None = None, workdir: str | Path | None = None,
                 device: str = "cpu"):
        self.tina = tina
        self.bundle = tina.bundle
        sampling = self.bundle.meta.get("sampling", {})
        self.default_steps = int(sampling.get("steps", 25))
        self.default_guidance = float(sampling.get("guidance", 1.0))
        self.default_sampler = str(sampling.get("sampler", "ddim"))
        if workdir is None:
            # Under the system temp dir, which Gradio lets handlers return files from.
            self.workdir = Path(tempfile.mkdtemp(prefix="tina-demo-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self._export_lock = threading.Lock()  # torch.export (dynamo) is not thread-safe
        self._dataset_loader = dataset_loader or _load_dataset
        self._dataset_lock = threading.Lock()
        self._dataset: Any = None  # loaded on first use, read-only afterwards
        self._dataset_error: str | None = None
        # Route between the shipped checkpoints only when started with one of them (a user's own folder is used as it is).
        from tina.registry import checkpoint_name, shipped

        self.name = checkpoint_name(self.bundle.path)
        self.routes = self.name in shipped()
        self._generators = {str(Path(self.bundle.path).resolve()): tina}  # folder -> loaded Tina
        self._generators_lock = threading.Lock()
        self.device = device

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path = "default", device: str = "cpu", **kw) -> "Service":
        from tina.sample import Tina

        return cls(Tina.from_pretrained(checkpoint, device=device), device=device, **kw)

    def generator(self, path: str | Path):
        """The Tina for a checkpoint folder: loaded on first use (once, under a lock), then kept."""
        from tina.sample import Tina

        key = str(Path(path).resolve())
        with self._generators_lock:
            if key not in self._generators:
                log.info("routing picked %s: loading it", path)
                self._generators[key] = Tina.from_pretrained(path, device=self.device)
            return self._generators[key]

    @property
    def image_prompts_available(self) -> bool:
        return bool(self.bundle.projector)

    # ---- plain operations (raise TinaError) ----------------------------------------------------

    def generate(self, prompt: str | None, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, image_prompts: list[tuple[str, list]] | None = None, allow_unknown: bool = False):
        """A TargetNet for the prompt (and optional per-class image prompts), with `.classes` and `.tina_info`.

        Classes too far from the vocabulary are refused (TinaError, naming a shipped checkpoint that
        knows them) unless `allow_unknown`; `.tina_info` carries the routing decision and expected accuracy."""
        from tina.prompts import MAX_PROMPT_CHARS
        from tina.routing import prompt_classes, route

        prompt = str(prompt or "").strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise TinaError(f"the prompt is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS} "
                            "(just the class names, e.g. 'classify sneakers vs sandals')")
        images = self._read_image_prompts(image_prompts or [])
        if not prompt and not images:
            raise TinaError("type a prompt first, e.g. 'classify sneakers vs sandals'")
        seed, steps, guidance, sampler = self._check_settings(seed, steps, guidance, sampler)
        names = list(images) if images and not prompt else None
        # Image-prompted demos stay on the started checkpoint (the images were read for its image spec).
        decision = route(prompt_classes(prompt or None, names), None if self.routes and not images else self.bundle.path)
        tina = self.generator(decision.card.path)
        # Image rows alone name the classes; passing them as `classes` gets them checked (two or more, no repeats).
        task = tina.make_task(prompt or None, names, images or None)
        if task.assessment.unknown and not allow_unknown:
            raise TinaError(decision.refusal([m.name for m in task.assessment.unknown]).replace("pass --allow-unknown",
                                                                                                 "tick 'allow unknown classes'"))
        model = tina.generate_tasks([task], seed=seed, steps=steps, guidance=guidance, sampler=sampler)[0]
        model.tina_info |= {"routing": decision.info(), "allowed_unknown": bool(task.assessment.unknown),
                            "summary": task.assessment.summary(), "resolved": task.assessment.resolved()}
        model.tina_bundle = tina.bundle  # its image spec reads the images it classifies
        return model

    def answer(self, model) -> dict:
        """What a script gets for a generated model: classes, routing decision, expected accuracy, warnings."""
        info = model.tina_info
        keys = ("classes", "routing", "expected_accuracy", "known_classes", "unknown_classes", "allowed_unknown",
                "warnings", "seed", "steps", "sampler", "guidance")
        return {k: info.get(k) for k in keys} | {"summary": info.get("summary"),
                                                 "parameters": sum(p.numel() for p in model.parameters())}

    def predict(self, model, image) -> dict[str, float]:
        """Class probabilities {class: p} for one image (a path, Gradio file payload, PIL image or array)."""
        if model is None:
            raise TinaError("generate a classifier first: type a prompt and press Generate")
        x = self.read_image(image, getattr(model, "tina_bundle", self.bundle).image)  # (C, H, W)
        with torch.no_grad():
            probs = model(x[None]).softmax(-1)[0]  # (k,)
        if not torch.isfinite(probs).all():
            raise TinaError("this classifier returns NaN for the image; generate again with another seed")
        return {c: float(p) for c, p in zip(model.classes, probs.tolist())}

    def export_zip(self, model) -> Path:
        """The generated model folder (tina.export format), zipped, in a fresh temporary folder."""
        from tina.export import save_generated

        if model is None:
            raise TinaError("generate a classifier first, then download it")
        out = Path(tempfile.mkdtemp(prefix="request-", dir=self.workdir))
        name = _slug(model.classes)
        with self._export_lock:
            save_generated(model, out / name)
        archive = shutil.make_archive(str(out / name), "zip", root_dir=out, base_dir=name)
        shutil.rmtree(out / name, ignore_errors=True)  # keep only the zip
        return Path(archive)

    def samples(self, n: int = NUM_SAMPLES, seed: int | None = None) -> list[Sample]:
        """`n` random test images of the checkpoint's dataset (a new draw per call unless `seed`)."""
        ds = self._get_dataset()
        rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
        idx = rng.choice(len(ds.test_y), size=min(n, len(ds.test_y)), replace=False)
        return [self.sample(int(i)) for i in idx]

    def sample(self, index: int) -> Sample:
        ds = self._get_dataset()
        index = int(index)
        if not 0 <= index < len(ds.test_y):
            raise TinaError(f"no test image {index}; the test split has {len(ds.test_y)}")
        img = np.asarray(ds.test_x[index])  # uint8 (H, W, C)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]  # grayscale as (H, W): browsers show it as it is
        return Sample(index, img, ds.classes[int(ds.test_y[index])])

    # ---- helpers -------------------------------------------------------------------------------

    def describe(self, model) -> str:
        """Markdown: classes in output order, parameter count, time, settings and vocabulary warnings."""
        info = model.tina_info
        k = len(model.classes)
        n_total = sum(p.numel() for p in model.parameters())
        bundle = getattr(model, "tina_bundle", self.bundle)
        n_gen = bundle.layout.num_params(k)
        params = f"{n_total:,} parameters" + (" (all generated)" if n_gen == n_total else f" ({n_gen:,} generated)")
        lines = [
            "**Classes (output order):** " + " · ".join(f"{i} = **{_md(c)}**" for i, c in enumerate(model.classes)),
            f"{k}-class {_md(bundle.target)}, {params}, generated in {info['seconds']:.2f} s "
            f"(seed {info['seed']}, {info['steps']} {info['sampler']} steps, guidance {info['guidance']:g})",
        ]
        if info.get("routing"):
            lines.append(f"**Checkpoint:** {_md(info['routing']['reason'])}")
        if info.get("resolved"):
            lines.append(f"**Known classes used:** {_md(info['resolved'])}")
        if info.get("summary"):
            lines.append(f"**{_md(info['summary'])}**")
        lines += [f"⚠️ {_md(w)}" for w in info.get("warnings", [])]
        return "\n\n".join(lines)

    def read_image(self, image, spec=None) -> torch.Tensor:
        """(C, H, W) floats in [0, 1] for an image spec (default: the started checkpoint's); TinaError for anything unreadable."""
        from PIL import Image

        from tina.images import load_image

        src = _image_source(image)
        if isinstance(src, (str, Path)):
            if not Path(src).is_file():
                raise TinaError("the uploaded file is gone; upload it again")
            if Path(src).stat().st_size > MAX_UPLOAD_BYTES:
                raise TinaError(f"that file is {Path(src).stat().st_size / 2**20:.0f} MB; images up to "
                                f"{MAX_UPLOAD_BYTES // 2**20} MB are accepted")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return load_image(src, spec or self.bundle.image)
        except Image.DecompressionBombError:
            raise TinaError("that image has too many pixels; use one under 50 megapixels") from None

    def _read_image_prompts(self, rows: list[tuple[str, list]]) -> dict[str, torch.Tensor]:
        """{class name as Tina writes it: (n, C, H, W) images} from the accordion's (name, files) rows."""
        from tina.prompts import normalize_class

        images: dict[str, torch.Tensor] = {}
        for name, files in rows:
            name = normalize_class(name or "") if (name or "").strip() else ""
            files = [f for f in (files or []) if f is not None] if isinstance(files, (list, tuple)) else [files] if files else []
            if not name and not files:
                continue
            if not name:
                raise TinaError("an image prompt needs a class name next to its images")
            if not files:
                raise TinaError(f"the image prompt for {name!r} has no images; upload some or clear its class name")
            if len(files) > MAX_PROMPT_IMAGES:
                raise TinaError(f"{len(files)} images for {name!r}; use at most {MAX_PROMPT_IMAGES}")
            if name in images:
                raise TinaError(f"class {name!r} has two image-prompt rows; put its images in one")
            images[name] = torch.stack([self.read_image(f) for f in files])  # (n, C, H, W)
        if images and not self.image_prompts_available:
            raise TinaError("this checkpoint was trained without an image projector, so it takes no image prompts; "
                            "describe the classes in words instead")
        return images

    def _check_settings(self, seed, steps, guidance, sampler) -> tuple[int, int, float, str]:
        """Form strings -> numbers, then the library's one settings check (tina.diffusion.resolve_sampling);
        the demo only adds its own caps on work per request."""
        from tina.diffusion import resolve_sampling

        try:
            seed = 0 if seed is None or seed == "" else int(float(seed))
            steps = None if steps in (None, "", 0) else int(float(steps))
            guidance = None if guidance in (None, "") else float(guidance)
        except (TypeError, ValueError, OverflowError):
            raise TinaError("seed, steps and guidance must be numbers") from None
        defaults = {"steps": self.default_steps, "guidance": self.default_guidance, "sampler": self.default_sampler}
        s = resolve_sampling(defaults, seed, steps, guidance, sampler or None)
        if s.steps > MAX_STEPS:
            raise TinaError(f"steps must be between 1 and {MAX_STEPS}, got {s.steps}")
        if s.guidance > MAX_GUIDANCE:
            raise TinaError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {s.guidance}")
        return s.seed, s.steps, s.guidance, s.sampler

    def _get_dataset(self):
        with self._dataset_lock:
            if self._dataset is None and self._dataset_error is None:
                try:
                    self._dataset = self._dataset_loader(self.bundle.meta.get("dataset_config") or self.bundle.dataset)
                except TinaError as e:
                    self._dataset_error = str(e)
                except Exception as e:  # noqa: BLE001 - a broken dataset must not break the demo
                    log.exception("loading the %s dataset failed", self.bundle.dataset)
                    self._dataset_error = f"loading the {self.bundle.dataset} dataset failed ({type(e).__name__})"
        if self._dataset_error is not None:
            raise TinaError(self._dataset_error)
        return self._dataset



def _image_source(image):
    """A path or file-like object for load_image, from whatever Gradio or a test hands over."""
    import io

    from PIL import Image

    if image is None:
        raise TinaError("no image: upload one, or pick a test image")
    if isinstance(image, dict):  # a Gradio FileData payload (the Image input skips Gradio's decoding)
        path = image.get("path")
        if not path:
            raise TinaError("the upload did not arrive; try again")
        return path
    if hasattr(image, "path") and isinstance(getattr(image, "path"), str):  # FileData object
        return image.path
    if isinstance(image, (str, Path)):
        return image
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError):
            raise TinaError(f"cannot read an image array of shape {image.shape} and type {image.dtype}") from None
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        buf.seek(0)
        return buf
    raise TinaError(f"cannot read an image from a {type(image).__name__}")


def _md(text: str) -> str:
    """User text, escaped for Markdown (and HTML) so a class name cannot restyle the page."""
    text = html.escape(str(text), quote=False)
    return "".join("\\" + ch if ch in "\\`*_{}[]#|~" else ch for ch in text)


def _slug(classes: list[str]) -> str:
    s = "-vs-".join(c.replace(" ", "_") for c in classes)
    return "".join(ch for ch in s if ch.isalnum() or ch in "-_")[:80] or "model"
