"""The Gradio demo: type a task, get a classifier, try it on an image, download it.

    tina demo [--checkpoint default|clipart|PATH] [--host 127.0.0.1] [--port 7860] [--share]
    python -m serve ...            (the same)

Layout: a prompt with examples and a Generate button (sampling settings and per-class image prompts
in accordions) → the parsed classes in output order, parameter count, time and vocabulary warnings;
an image (upload, or a test image of the checkpoint's dataset) → class probabilities; a zip of the
generated model folder.

Everything testable without Gradio (generators, routing between shipped checkpoints, images) is
serve/service.py; this file is the page and its handlers.

Concurrency: the checkpoint is loaded once per process into a `Demo`; a checkpoint routing picks for a
prompt is loaded once, under a lock, and kept; nothing else changes after start (but the read-only
sample dataset, filled lazily). Each browser session's generated model
lives in that session's `gr.State`; each download is written to its own temporary folder; the
sampler builds a fresh scheduler per call. Handlers never raise: user mistakes (`TinaError`) and
unexpected failures become a toast plus a line in the status area, never a traceback in the page.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # and never phones home

import gradio as gr  # noqa: E402

from serve.service import (  # noqa: E402, F401 - NUM_SAMPLES, Sample: re-exported for scripts and tests
    IMAGE_PROMPT_ROWS, MAX_UPLOAD_BYTES, NUM_SAMPLES, STATE_TTL_S, Sample, Service, _md, examples_for,
)
from tina.errors import TinaError  # noqa: E402

log = logging.getLogger(__name__)


class Demo(Service):
    """The service plus what the page calls: the `on_*` handlers never raise and return values for its components."""

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
        return self.answer(model)

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
