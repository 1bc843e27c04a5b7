"""The Gradio demo: type a task, get a classifier, try it on an image, download it.

    tina demo [--checkpoint default|clipart|PATH] [--host 127.0.0.1] [--port 7860] [--share]
    python -m serve ...            (the same)

Layout: a prompt with examples and a Generate button (sampling settings and per-class image prompts
in accordions) → the parsed classes in output order, parameter count, time and vocabulary warnings;
an image (upload, or a test image of the checkpoint's dataset) → class probabilities; a zip of the
generated model folder.

Concurrency: the checkpoint is loaded once per process into a `Demo`, which no request changes (its
only lazily filled field is the read-only sample dataset). Each browser session's generated model
lives in that session's `gr.State`; each download is written to its own temporary folder; the
sampler builds a fresh scheduler per call. Handlers never raise: user mistakes (`TinaError`) and
unexpected failures become a toast plus a line in the status area, never a traceback in the page.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never waits on a model hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # and never phones home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tina.errors import TinaError  # noqa: E402

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


class Demo:
    """A loaded generator plus the demo's request handlers; shared by every session, changed by none.

    `generate`, `predict`, `export_zip` and `samples` are the plain operations (they raise TinaError).
    The `on_*` methods are what the page calls: they never raise and return values for its components.
    """

    def __init__(self, tina, dataset_loader: Callable[[str], Any] | None = None, workdir: str | Path | None = None):
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

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path = "default", device: str = "cpu", **kw) -> "Demo":
        from tina.sample import Tina

        return cls(Tina.from_pretrained(checkpoint, device=device), **kw)

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
        # Image rows alone name the classes; passing them as `classes` gets them checked (two or more, no repeats).
        task = self.tina.make_task(prompt or None, None if prompt else list(images), images or None)
        decision = route(prompt_classes(prompt or None, None if prompt else list(images)), self.bundle.path)
        if task.assessment.unknown and not allow_unknown:
            raise TinaError(decision.refusal([m.name for m in task.assessment.unknown]).replace("pass --allow-unknown",
                                                                                                 "tick 'allow unknown classes'"))
        model = self.tina.generate_tasks([task], seed=seed, steps=steps, guidance=guidance, sampler=sampler)[0]
        model.tina_info |= {"routing": decision.info(), "allowed_unknown": bool(task.assessment.unknown),
                            "summary": task.assessment.summary(), "resolved": task.assessment.resolved()}
        return model

    def api_generate(self, prompt: str, seed: int = 0, steps: int = 0, guidance: float = -1.0, sampler: str = "",
                     allow_unknown: bool = False) -> dict:
        """For scripts (`client.predict(prompt=..., api_name="/generate")`): classes, routing decision,
        expected accuracy and warnings of the classifier the prompt gives (steps 0 / guidance < 0 /
        sampler "": the checkpoint's defaults)."""
        try:
            model = self.generate(prompt, seed, steps or None, None if guidance < 0 else guidance, sampler or None,
                                  allow_unknown=allow_unknown)
        except TinaError as e:
            raise gr.Error(str(e)) from None
        info = model.tina_info
        keys = ("classes", "routing", "expected_accuracy", "known_classes", "unknown_classes", "allowed_unknown",
                "warnings", "seed", "steps", "sampler", "guidance")
        return {k: info.get(k) for k in keys} | {"parameters": sum(p.numel() for p in model.parameters())}

    def predict(self, model, image) -> dict[str, float]:
        """Class probabilities {class: p} for one image (a path, Gradio file payload, PIL image or array)."""
        if model is None:
            raise TinaError("generate a classifier first: type a prompt and press Generate")
        x = self.read_image(image)  # (C, H, W)
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

    # ---- what the page calls (never raise) -----------------------------------------------------

    def on_generate(self, model, prompt, seed, steps, guidance, sampler, *rows, allow_unknown: bool = False):
        """→ (model state, status markdown, update hiding the old download). `rows`: class name, files, class name, files, ..."""
        image_prompts = [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]
        try:
            new = self.generate(prompt, seed, steps, guidance, sampler, image_prompts, allow_unknown=bool(allow_unknown))
        except Exception as e:  # noqa: BLE001 - the page shows a message, never a traceback
            msg = _user_message(e, "generating")
            kept = f"\n\nThe previous classifier ({', '.join(map(_md, model.classes))}) is still loaded." if model is not None else ""
            return model, f"**Could not generate:** {_md(msg)}{kept}", _hidden_file()
        return new, self.describe(new), _hidden_file()

    def on_predict(self, model, image, quiet: bool = False):
        """→ (label value {class: p} or None, prediction markdown). `quiet`: no toast for a missing model/image."""
        if image is None or (model is None and quiet):
            return None, ""
        try:
            probs = self.predict(model, image)
        except Exception as e:  # noqa: BLE001
            if quiet and model is None:
                return None, ""
            return None, f"**Could not classify:** {_md(_user_message(e, 'classifying'))}"
        top = max(probs, key=probs.get)
        return probs, f"Prediction: **{_md(top)}** ({probs[top]:.0%})"

    def on_refresh_prediction(self, model, image):
        """After Generate: classify the image already on the page with the new model, silently."""
        return self.on_predict(model, image, quiet=True)

    def on_export(self, model):
        """→ an update showing the zip in the gr.File, or hiding it (with a toast)."""
        try:
            return gr.update(value=str(self.export_zip(model)), visible=True)
        except Exception as e:  # noqa: BLE001
            _user_message(e, "exporting")
            return _hidden_file()

    def on_samples(self):
        """→ (gallery items [(image, caption)], indices state, gallery note)."""
        try:
            items = self.samples()
        except Exception as e:  # noqa: BLE001
            msg = _user_message(e, "loading sample images", notify=False)
            return [], [], f"Sample images are unavailable: {_md(msg)}"
        return [(s.image, s.label) for s in items], [s.index for s in items], "Click a test image to classify it."

    def on_random_sample(self):
        """→ (image for the input, caption) of one random test image."""
        try:
            s = self.samples(1)[0]
        except Exception as e:  # noqa: BLE001
            return None, f"Sample images are unavailable: {_md(_user_message(e, 'loading a sample image'))}"
        return s.image, f"Test image #{s.index}, true class: **{_md(s.label)}**"

    def on_pick_sample(self, indices, evt=None):
        """Gallery click → (image for the input, caption)."""
        try:
            i = evt.index if evt is not None else None
            if i is None or not indices or not 0 <= int(i) < len(indices):
                raise TinaError("pick one of the test images")
            s = self.sample(indices[int(i)])
        except Exception as e:  # noqa: BLE001
            return None, f"**Could not load the image:** {_md(_user_message(e, 'loading a sample image'))}"
        return s.image, f"Test image #{s.index}, true class: **{_md(s.label)}**"

    # ---- helpers -------------------------------------------------------------------------------

    def describe(self, model) -> str:
        """Markdown: classes in output order, parameter count, time, settings and vocabulary warnings."""
        info = model.tina_info
        k = len(model.classes)
        n_total = sum(p.numel() for p in model.parameters())
        n_gen = self.bundle.layout.num_params(k)
        params = f"{n_total:,} parameters" + (" (all generated)" if n_gen == n_total else f" ({n_gen:,} generated)")
        lines = [
            "**Classes (output order):** " + " · ".join(f"{i} = **{_md(c)}**" for i, c in enumerate(model.classes)),
            f"{k}-class {_md(self.bundle.target)}, {params}, generated in {info['seconds']:.2f} s "
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

    def read_image(self, image) -> torch.Tensor:
        """(C, H, W) floats in [0, 1] for the checkpoint's image spec; TinaError for anything unreadable."""
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
                return load_image(src, self.bundle.image)
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
        from tina.diffusion import SAMPLERS

        try:
            seed = 0 if seed is None or seed == "" else int(float(seed))
            steps = self.default_steps if steps in (None, "", 0) else int(float(steps))
            guidance = self.default_guidance if guidance in (None, "") else float(guidance)
        except (TypeError, ValueError):
            raise TinaError("seed, steps and guidance must be numbers") from None
        if not 0 <= seed < 2**63:
            raise TinaError(f"seed must be between 0 and 2^63 - 1, got {seed}")
        if not 1 <= steps <= MAX_STEPS:
            raise TinaError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
            raise TinaError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance}")
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise TinaError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        return seed, steps, guidance, sampler

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


def _user_message(e: Exception, doing: str, notify: bool = True) -> str:
    """The message to show for an exception; a toast too. Bugs are logged with their traceback, shown without."""
    if isinstance(e, TinaError):
        msg = str(e)
    else:
        log.exception("unexpected error while %s", doing)
        msg = f"something went wrong while {doing} ({type(e).__name__}); the server log has the details"
    if notify:
        gr.Warning(html.escape(msg))
    return msg


def _hidden_file() -> dict:
    """An update that empties and hides the download box (fresh each time: Gradio may edit updates)."""
    return gr.update(value=None, visible=False)


def _md(text: str) -> str:
    """User text, escaped for Markdown (and HTML) so a class name cannot restyle the page."""
    text = html.escape(str(text), quote=False)
    return "".join("\\" + ch if ch in "\\`*_{}[]#|~" else ch for ch in text)


def _slug(classes: list[str]) -> str:
    s = "-vs-".join(c.replace(" ", "_") for c in classes)
    return "".join(ch for ch in s if ch.isalnum() or ch in "-_")[:80] or "model"


# ---- the page ----------------------------------------------------------------------------------

# Small images (28×28 Fashion-MNIST) are shown enlarged with crisp pixels instead of as a speck.
CSS = """
#image-input img { min-width: 168px; min-height: 168px; object-fit: contain; image-rendering: pixelated; }
#samples img { image-rendering: pixelated; }
"""
INTRO = """# Tina: text → classifier
Type what to tell apart. A diffusion transformer samples the weights of a small image classifier for
exactly those classes, in the order you wrote them: no training, no data. Then try it on an image.
Each checkpoint knows a fixed set of classes; Tina says which it used, how accurate the classifier is
expected to be, and refuses classes it does not know.
"""


def build_blocks(demo: Demo):
    """The page, wired to `demo`'s handlers. Per-session state: the generated model and the gallery's indices."""
    from tina.diffusion import SAMPLERS

    spec = demo.bundle.image
    with gr.Blocks(title="Tina: text to classifier", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        model_state = gr.State(None, time_to_live=STATE_TTL_S)
        sample_indices = gr.State([])
        gr.Markdown(INTRO)
        kind = "greyscale" if spec.channels == 1 else "RGB"
        gr.Markdown(f"**This checkpoint knows** ({_md(demo.bundle.dataset)}, {spec.size}×{spec.size} {kind} images): "
                    + ", ".join(_md(c) for c in demo.bundle.vocab), elem_id="vocabulary")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="classify sneakers vs sandals", lines=2, max_lines=6,
                                    elem_id="prompt", submit_btn=False)
                gr.Examples(examples_for(demo.bundle.dataset, demo.bundle.vocab), inputs=[prompt], label="Examples")
                generate_btn = gr.Button("Generate classifier", variant="primary", elem_id="generate")
                status = gr.Markdown("No classifier yet: type a prompt and press **Generate classifier**.",
                                     elem_id="status")
                download_btn = gr.Button("Download model folder (.zip)", elem_id="download")
                download = gr.File(label="Generated model folder", elem_id="model-zip", interactive=False, visible=False)
                with gr.Accordion("Sampling settings", open=False):
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    steps = gr.Slider(1, 100, value=demo.default_steps, step=1, label="Steps")
                    guidance = gr.Slider(0.0, 10.0, value=demo.default_guidance, step=0.1,
                                         label="Guidance", info="classifier-free guidance scale; 1 = none")
                    sampler = gr.Dropdown(list(SAMPLERS), value=demo.default_sampler, label="Sampler")
                    allow_unknown = gr.Checkbox(False, label="Allow unknown classes",
                                                info="generate even for classes far from every known class (near-chance models)")
                with gr.Accordion("Image prompts (advanced)", open=False):
                    gr.Markdown(
                        "Describe a class with example images instead of (or as well as) words. Each class name must "
                        "be one of the prompt's classes; with an empty prompt the rows define the classes."
                        + ("" if demo.image_prompts_available else
                           "\n\n*This checkpoint has no image projector, so image prompts are not available.*"))
                    rows = []
                    for i in range(IMAGE_PROMPT_ROWS):
                        with gr.Row(visible=demo.image_prompts_available):  # still inputs when hidden
                            rows.append(gr.Textbox(label=f"Class {i + 1}", placeholder="e.g. sandal", scale=1))
                            rows.append(gr.File(label="Images", file_count="multiple", file_types=["image"],
                                                type="filepath", scale=2, height=130))
            with gr.Column(scale=1):
                image = gr.Image(label=f"Image to classify (the model sees {spec.size}×{spec.size}"
                                       f"{' grayscale' if spec.channels == 1 else ''})",
                                 type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
                                 height=240, elem_id="image-input")
                random_btn = gr.Button("Random test image", elem_id="random-image")
                caption = gr.Markdown("", elem_id="image-caption")
                label = gr.Label(label="Class probabilities", elem_id="prediction")
                prediction = gr.Markdown("", elem_id="prediction-text")
                with gr.Accordion(f"Test images ({demo.bundle.dataset})", open=True):
                    gallery_note = gr.Markdown("")
                    gallery = gr.Gallery(label="Test images", show_label=False, columns=5, height=240,
                                         allow_preview=False, format="png", object_fit="contain", elem_id="samples")

        def on_generate(model, prompt, seed, steps, guidance, sampler, allow, *rows):
            return demo.on_generate(model, prompt, seed, steps, guidance, sampler, *rows, allow_unknown=allow)

        gen = dict(fn=on_generate, inputs=[model_state, prompt, seed, steps, guidance, sampler, allow_unknown, *rows],
                   outputs=[model_state, status, download])
        refresh = dict(fn=demo.on_refresh_prediction, inputs=[model_state, image], outputs=[label, prediction])
        generate_btn.click(**gen, api_name="generate_ui").then(**refresh, show_progress="hidden")
        gr.api(demo.api_generate, api_name="generate")  # named arguments with defaults: a prompt is enough
        prompt.submit(**gen, api_name=False).then(**refresh, show_progress="hidden")
        # The Image input skips Gradio's decoding (preprocess=False) so that tina.images reads the file and
        # a non-image or a decompression bomb becomes a message; Gradio still checks the file was uploaded.
        image.change(demo.on_predict, [model_state, image], [label, prediction], preprocess=False, api_name="predict")
        random_btn.click(demo.on_random_sample, None, [image, caption], api_name=False)

        def pick(indices, evt: gr.SelectData):
            return demo.on_pick_sample(indices, evt)

        gallery.select(pick, [sample_indices], [image, caption], api_name=False)
        app.load(demo.on_samples, None, [gallery, sample_indices, gallery_note], api_name=False)
        download_btn.click(demo.on_export, [model_state], [download], api_name="download")
    return app


def build_app(checkpoint: str | Path = "default", device: str = "cpu", demo: Demo | None = None):
    """The Gradio Blocks app for a generator checkpoint (loaded once here), or for a ready `demo`."""
    demo = demo or Demo.from_checkpoint(checkpoint, device)
    app = build_blocks(demo)
    app.tina_demo = demo  # keeps the Demo (and its temp folder) alive as long as the app
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, concurrency: int = 4,
           block: bool = True):
    """Queue and serve `app`; returns Gradio's (app, local_url, share_url)."""
    app.queue(default_concurrency_limit=concurrency, max_size=256)
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                      max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, css=CSS, show_error=False, quiet=not block)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tina demo", description="Start the Tina web demo (Gradio).")
    ap.add_argument("--checkpoint", default="default", help="generator folder, or a shipped name (default, fashion-mnist, clipart)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve the network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    ap.add_argument("--concurrency", type=int, default=4, help="requests handled at once per event")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`tina demo ARGS...` and `python -m serve ARGS...`."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print(f"error: --concurrency must be at least 1, got {args.concurrency}", file=sys.stderr)
        return 2
    try:
        app = build_app(args.checkpoint, args.device)
    except TinaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        launch(app, host=args.host, port=args.port, share=args.share, concurrency=args.concurrency)
    except KeyboardInterrupt:
        pass
    except OSError as e:  # port taken, address not available
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0
