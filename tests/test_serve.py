"""The demo's handlers, called directly (no server, no browser): answers, bad inputs, concurrency.

Every `on_*` handler must answer bad input with a message, never an exception; the generator is the
untrained `random_bundle`, so predictions are random but well-formed.
"""

import html
import gzip
import os
import struct
import sys
import threading
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tina.errors import TinaError  # noqa: E402

pytest.importorskip("gradio")

from serve.app import MAX_UPLOAD_BYTES, NUM_SAMPLES, Demo, build_app, build_parser, main  # noqa: E402

# gr.Warning outside a running server is a Python warning; the handlers' toasts are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def fashion_test_set():
    """The Fashion-MNIST test split (classes, test_x uint8 (N, 28, 28, 1), test_y), or skip.

    Prefers tina.training.datasets; falls back to reading Debian's IDX files directly, so the demo tests do not
    depend on the datasets module being finished.
    """
    try:
        from tina.training.datasets import load_dataset

        ds = load_dataset("fashion-mnist")
        return SimpleNamespace(classes=list(ds.classes), test_x=ds.test_x, test_y=ds.test_y)
    except (ImportError, TinaError):
        pass
    images, labels = FASHION_ROOT / "t10k-images-idx3-ubyte.gz", FASHION_ROOT / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        pytest.skip(f"Fashion-MNIST not found (tina.training.datasets, or {FASHION_ROOT}: apt-get install dataset-fashion-mnist)")
    from tina.training.testing import FASHION_CLASSES

    x = np.frombuffer(gzip.decompress(images.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    y = np.frombuffer(gzip.decompress(labels.read_bytes()), np.uint8, offset=8).astype(np.int64)
    return SimpleNamespace(classes=list(FASHION_CLASSES), test_x=x, test_y=y)


def write_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(path)
    return path


@pytest.fixture(scope="module")
def fashion():
    return fashion_test_set()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, fashion):
    from tina.training.testing import random_bundle

    path = random_bundle(tmp_path_factory.mktemp("serve") / "gen")
    return Demo.from_checkpoint(path, dataset_loader=lambda name: fashion)


@pytest.fixture(scope="module")
def model(demo):
    new, status, _ = demo.on_generate(None, "classify sneakers vs sandals", 0, None, None, None)
    assert new is not None, status
    return new


@pytest.fixture()
def image_png(fashion, tmp_path):
    return write_png(fashion.test_x[0], tmp_path / "fashion.png")


def is_error(status: str, words: str) -> bool:
    return status.startswith("**Could not") and words.lower() in status.lower()


# ---- the happy path ----------------------------------------------------------------------------

def test_generate_shows_classes_params_time(demo):
    new, status, download = demo.on_generate(None, "t-shirt, pullover, coat or shirt", 3, 5, 1.0, "ddim")
    assert new.classes == ["t-shirt", "pullover", "coat", "shirt"]
    assert "0 = **t-shirt** · 1 = **pullover** · 2 = **coat** · 3 = **shirt**" in status
    n = sum(p.numel() for p in new.parameters())
    assert f"{n:,} parameters" in status and "generated in" in status and "seed 3, 5 ddim steps" in status
    assert download["visible"] is False  # a new model hides the previous model's zip


def test_vocabulary_warning_is_shown(demo):
    # a description this checkpoint does not know well enough is refused, naming the checkpoint that does...
    none, status, _ = demo.on_generate(None, "an open shoe held on by straps vs a warm winter coat", 0, None, None, None)
    assert none is None and "Could not generate" in status and "allow unknown classes" in status
    # ...and generated with a warning when the user insists
    new, status, _ = demo.on_generate(None, "an open shoe held on by straps vs a warm winter coat", 0, None, None, None,
                                      allow_unknown=True)
    assert len(new.classes) == 2
    assert new.tina_info["warnings"] and "⚠️" in status and "far from" in status


def test_predict_real_image(demo, model, image_png):
    probs, text = demo.on_predict(model, image_png)
    assert list(probs) == model.classes
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert text.startswith("Prediction: **")
    # The same image as a Gradio file payload, a PIL image and an array gives the same answer.
    from PIL import Image

    for same in ({"path": str(image_png), "orig_name": "x.png"}, Image.open(image_png), np.asarray(Image.open(image_png))):
        assert demo.on_predict(model, same)[0] == pytest.approx(probs)


def test_new_model_reclassifies_the_image_quietly(demo, model, image_png):
    assert demo.on_refresh_prediction(model, image_png)[0].keys() == set(model.classes)
    assert demo.on_refresh_prediction(None, image_png) == (None, "")  # no toast before the first model
    assert demo.on_refresh_prediction(model, None) == (None, "")


def test_export_zip_is_a_loadable_model_folder(demo, model, tmp_path):
    from tina.export import load_generated

    update = demo.on_export(model)
    zip_path = Path(update["value"])
    assert update["visible"] and zip_path.suffix == ".zip" and zip_path.is_relative_to(demo.workdir)
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        z.extractall(tmp_path)
    folder = tmp_path / "sneaker-vs-sandal"
    assert {f"sneaker-vs-sandal/{f}" for f in ("config.json", "model.safetensors", "model.pt2")} <= names
    net = load_generated(folder)
    assert net.classes == model.classes
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(net(x), model(x))


def test_sample_gallery_and_random_image(demo, fashion):
    items, indices, note = demo.on_samples()
    assert len(items) == len(indices) == NUM_SAMPLES and "Click" in note
    img, caption = items[2]
    assert img.shape == (28, 28) and caption == fashion.classes[fashion.test_y[indices[2]]]
    picked, text = demo.on_pick_sample(indices, SimpleNamespace(index=2))
    np.testing.assert_array_equal(picked, fashion.test_x[indices[2], :, :, 0])
    assert caption in text
    img, text = demo.on_random_sample()
    assert img.shape == (28, 28) and "true class" in text


# ---- bad input: a message, never an exception -----------------------------------------------------

@pytest.mark.parametrize("prompt, words", [
    pytest.param(None, "type a prompt", id="none"),
    pytest.param("", "type a prompt", id="empty"),
    pytest.param("   \n\t ", "type a prompt", id="blank"),
    pytest.param("x" * 1001, "1,001 characters", id="1001-chars"),
    pytest.param("sneakers vs sandals " * 50_000, "characters", id="1MB"),
    pytest.param("sneakers", "one class", id="one-class"),
    pytest.param("sneakers vs sneakers", "twice", id="duplicate"),
    pytest.param(", ".join(f"class number {i}" for i in range(11)) + " or bags", "at most 10", id="12-classes"),
])
def test_bad_prompts_give_messages(demo, model, prompt, words):
    kept, status, _ = demo.on_generate(model, prompt, 0, None, None, None)
    assert kept is model  # the previous classifier stays loaded
    assert is_error(status, words), status
    assert "still loaded" in status


@pytest.mark.parametrize("seed, steps, guidance, sampler, words", [
    ("abc", None, None, None, "numbers"),
    (-1, None, None, None, "seed"),
    (0, 10**9, None, None, "steps"),
    (0, -3, None, None, "steps"),
    (0, None, float("nan"), None, "guidance"),
    (0, None, 1e9, None, "guidance"),
    (0, None, None, "euler-magic", "sampler"),
])
def test_bad_settings_give_messages(demo, seed, steps, guidance, sampler, words):
    new, status, _ = demo.on_generate(None, "sneakers vs sandals", seed, steps, guidance, sampler)
    assert new is None and is_error(status, words), status


def crafted_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb, safely)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_bad_images_give_messages(demo, model, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse: the size check fires before anything reads it
        f.truncate(MAX_UPLOAD_BYTES + 1)
    cases = {
        "not a readable image": [text, empty, {"path": str(text)}],
        "decode budget": [crafted_png(tmp_path / "big.png", 9000, 9000)],  # 81 MP: over tina.images' budget
        "MB": [huge],
        "too many pixels": [crafted_png(tmp_path / "bomb.png", 30000, 30000)],
        "is gone": [tmp_path / "missing.png", {"path": str(tmp_path / "nope.png")}],
        "did not arrive": [{"path": None}],
        "cannot read an image": [np.zeros((4, 4, 7), np.float64), 12345],
    }
    for words, images in cases.items():
        for bad in images:
            probs, status = demo.on_predict(model, bad)
            assert probs is None and is_error(status, words), (bad, status)


def test_predict_without_model_or_image(demo, image_png):
    assert demo.on_predict(None, None) == (None, "")  # a cleared image clears the answer
    probs, status = demo.on_predict(None, image_png)
    assert probs is None and is_error(status, "generate a classifier first")


def test_export_without_model(demo):
    assert demo.on_export(None) == {"__type__": "update", "value": None, "visible": False}


def test_image_prompt_rows(demo, image_png):
    # Rows are (class name, files); incomplete rows and checkpoints without a projector give messages.
    for rows, words in [
        (("sandal", None), "has no images"),
        (("", [str(image_png)]), "needs a class name"),
        (("sandal", [str(image_png)], "sandal", [str(image_png)]), "two image-prompt rows"),
        (("sandal", [str(image_png)] * 17), "at most 16"),
        (("sandal", [str(image_png)]), "without an image projector"),
    ]:
        new, status, _ = demo.on_generate(None, "sneakers vs sandals", 0, None, None, None, *rows)
        assert new is None and is_error(status, words), status
    # Empty rows are ignored.
    new, status, _ = demo.on_generate(None, "sneakers vs sandals", 0, None, None, None, "", None, " ", [])
    assert new.classes == ["sneaker", "sandal"]


def test_image_prompts_with_a_projector(tmp_path_factory, fashion, image_png):
    """With a (tiny, briefly trained) image projector in the checkpoint, image rows condition the classes."""
    from tina.training.projector import attach_projector
    from tina.training.testing import random_bundle

    try:
        path = random_bundle(tmp_path_factory.mktemp("projector") / "gen")
        attach_projector(path, train_limit=300, test_limit=100, epochs=1, width=4, batch_size=64)
    except TinaError as e:
        pytest.skip(f"cannot train a projector here: {e}")
    d = Demo.from_checkpoint(path, dataset_loader=lambda name: fashion)
    assert d.image_prompts_available
    png = str(image_png)
    new, status, _ = d.on_generate(None, "", 0, None, None, None, "Sandals", [png], "sneaker", [png, png])
    assert new.classes == ["sandal", "sneaker"], status
    new, status, _ = d.on_generate(None, "sneakers vs sandals", 0, None, None, None, "sandal", [png])
    assert new.classes == ["sneaker", "sandal"], status
    for rows, words in [(("coat", [png]), "not one of the classes"), (("sandal", [png], "Sandals", [png]), "two image-prompt rows")]:
        new, status, _ = d.on_generate(None, "sneakers vs sandals", 0, None, None, None, *rows)
        assert new is None and is_error(status, words), status
    new, status, _ = d.on_generate(None, "", 0, None, None, None, "sandal", [png])  # one class is no classifier
    assert new is None and is_error(status, "at least two"), status


def test_missing_dataset_gives_messages(demo):
    def broken(name):
        raise TinaError(f"{name} is not installed")

    d = Demo(demo.tina, dataset_loader=broken)
    items, indices, note = d.on_samples()
    assert items == [] and indices == [] and "not installed" in note
    assert d.on_random_sample()[0] is None
    assert d.on_pick_sample([], SimpleNamespace(index=0))[0] is None


def test_bugs_are_reported_without_traceback(demo, model, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("internal detail")

    monkeypatch.setattr(demo.tina, "generate_tasks", boom)
    new, status, _ = demo.on_generate(None, "sneakers vs sandals", 0, None, None, None)
    assert new is None and "RuntimeError" in status and "internal detail" not in status and "Traceback" not in status


def test_markdown_in_class_names_is_escaped(demo):
    new, status, _ = demo.on_generate(None, "<b>bold</b> vs [link](x)", 0, None, None, None)
    assert "<b>" not in status and "](" not in status


# ---- concurrency ---------------------------------------------------------------------------------

def test_20_concurrent_generate_and_predict(demo, image_png):
    """20 sessions at once: each gets its own classes back, in its own order, and a well-formed answer."""
    from tina.prompts import parse_prompt

    prompts = [
        "classify sneakers vs sandals", "t-shirt, pullover, coat or shirt", "bags or ankle boots",
        "dresses vs trousers vs coats", "sandals, sneakers and ankle boots",
    ]
    jobs = [(prompts[i % len(prompts)] if i % 2 else " or ".join(reversed(parse_prompt(prompts[i % len(prompts)]))), i)
            for i in range(20)]
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def session(i, prompt, seed):
        start.wait()
        try:
            model, status, _ = demo.on_generate(None, prompt, seed, None, None, None)
            probs, text = demo.on_predict(model, image_png)
            results[i] = (model, status, probs, text)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=session, args=(i, p, s)) for i, (p, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (prompt, seed), res in zip(jobs, results):
        assert not isinstance(res, BaseException) and res is not None, res
        model, status, probs, text = res
        expected = parse_prompt(prompt)
        assert model is not None, status
        assert model.classes == expected and model.tina_info["seed"] == seed
        assert "0 = **" in status and all(f"**{c}**" in status for c in expected)
        assert list(probs) == expected and abs(sum(probs.values()) - 1) < 1e-4
        assert all(np.isfinite(list(probs.values()))) and text.startswith("Prediction:")


def test_concurrent_exports_do_not_collide(demo, model):
    paths: list = []
    threads = [threading.Thread(target=lambda: paths.append(demo.on_export(model)["value"])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(set(paths)) == 3 and all(Path(p).is_file() for p in paths)


# ---- the app and its command line ------------------------------------------------------------------

def test_build_app_wires_the_handlers(demo):
    import gradio as gr

    app = build_app(demo=demo)
    assert isinstance(app, gr.Blocks) and app.tina_demo is demo
    api = {d.api_name for d in app.fns.values()}
    assert {"generate", "predict", "download"} <= api


def test_cli_defaults_and_errors(capsys):
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.checkpoint) == ("127.0.0.1", 7860, False, "default")
    assert main(["--checkpoint", "/nonexistent/generator"]) == 2
    assert "unknown checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", "x", "--port", "0"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--share" in capsys.readouterr().out


def test_tina_demo_and_python_m_serve_help(monkeypatch, capsys):
    import runpy

    from tina.cli import main as tina_main

    assert tina_main(["demo", "--checkpoint", "/nonexistent/generator"]) == 2
    monkeypatch.setattr(sys, "argv", ["python -m serve", "--help"])
    with pytest.raises(SystemExit) as e:  # in-process: a subprocess would spend seconds importing gradio again
        runpy.run_module("serve", run_name="__main__")
    assert e.value.code == 0 and "--host" in capsys.readouterr().out


def test_generate_shows_routing_expected_accuracy_and_warnings(demo):
    new, status, _ = demo.on_generate(None, "classify handbags vs sneakers", 0, None, None, None)
    assert new is not None and "Checkpoint:" in status and "expected accuracy" in status
    assert "handbag -> bag" in html.unescape(status).replace("\\", "")
    kept, status, _ = demo.on_generate(new, "hot dog or not hot dog", 0, None, None, None)
    assert kept is new and "allow unknown classes" in status
    forced, status, _ = demo.on_generate(None, "hot dog or not hot dog", 0, None, None, None, allow_unknown=True)
    assert forced is not None and forced.tina_info["allowed_unknown"] is True and "far from" in status


def test_api_generate_needs_only_a_prompt(demo):
    out = demo.api_generate("classify sneakers vs sandals")
    assert out["classes"] == ["sneaker", "sandal"] and "expected_accuracy" in out and out["routing"]["checkpoint"]
    app = build_app(demo=demo)
    info = app.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert info[0]["parameter_name"] == "prompt" and all(p["parameter_has_default"] for p in info[1:])


def test_demo_switches_to_the_checkpoint_routing_picks_and_reads_images_for_it():
    from tina.registry import shipped

    if not {"fashion-mnist", "clipart"} <= set(shipped()):
        pytest.skip("needs both shipped checkpoints")
    started = Demo.from_checkpoint("fashion-mnist", dataset_loader=lambda name: None)
    clip = started.generate("classify trees vs flowers vs fruit")
    assert clip.tina_info["routing"]["checkpoint"] == "clipart" and clip.tina_bundle.dataset != started.bundle.dataset
    probs = started.predict(clip, np.zeros((32, 32, 3), np.uint8))  # read as the clip-art generator's RGB 32x32
    assert list(probs) == clip.classes and abs(sum(probs.values()) - 1) < 1e-4
    assert "Checkpoint:" in started.describe(clip) and "routed clipart" in html.unescape(started.describe(clip))
    fm = started.generate("classify sneakers vs sandals")
    assert fm.tina_info["routing"]["checkpoint"] == "fashion-mnist" and fm.tina_bundle is started.bundle
    assert started.generator(clip.tina_bundle.path) is started.generator(clip.tina_bundle.path)  # loaded once, kept


def test_service_module_works_without_gradio():
    import subprocess

    code = "import sys, serve.service; assert 'gradio' not in sys.modules; print(serve.service.Service.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent, env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0 and out.stdout.strip() == "Service", out.stderr[-500:]
