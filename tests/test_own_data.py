"""Your own images end to end (README "Your own images"), and the one preprocessing path.

A small ImageFolder of coloured shapes (28x28 and 40x30 files, so rendering scales up and down) goes
through the documented commands: tina zoo build -> tina train -> tina generate -> tina predict. The same
images then go through every path that turns a picture into model input (the dataset renderer that
training and evaluation use, `tina predict`, the demo, the exported model.pt2), which must agree exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tina.cli import main as cli

CONFIGS = Path(__file__).parent.parent / "configs"
SHAPES = {  # folder -> (shape, colour); class_names maps two folders to other names
    "red_square": ("square", (220, 30, 30)),
    "blue_circle": ("circle", (30, 60, 220)),
    "c_green": ("triangle", (30, 180, 40)),
    "c_yellow": ("cross", (230, 200, 20)),
    "purple_bar": ("bar", (140, 40, 160)),
}
NAMES = {"c_green": "green triangle", "c_yellow": "yellow cross"}
TINY_ZOO = ["tasks.train=12", "tasks.val=3", "tasks.unseen_combo=3", "tasks.k_max=3", "generic.epochs=8",
            "finetune.steps=10", "shard_size=20", "runtime.threads=1"]  # fmt: skip
TINY_TRAIN = ["generator.size=DiT-T", "trainer.max_steps=4", "trainer.batch_size=8", "trainer.val_every=1000",
              "trainer.ckpt_every=1000", "val.tasks=2", "trainer.final_val_tasks=2", "optim.warmup_steps=1"]  # fmt: skip


def draw(path: Path, shape: str, colour, size, rng) -> None:
    w, h = size
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    s = rng.integers(min(w, h) // 3, min(w, h) * 2 // 3)
    x, y = rng.integers(0, w - s), rng.integers(0, h - s)
    box = (x, y, x + s, y + s)
    if shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    elif shape == "cross":
        d.rectangle((x + s // 3, y, x + 2 * s // 3, y + s), fill=colour)
        d.rectangle((x, y + s // 3, x + s, y + 2 * s // 3), fill=colour)
    else:
        d.rectangle((x, y + s // 3, x + s, y + 2 * s // 3), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_imagefolder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for folder, (shape, colour) in SHAPES.items():
        for i in range(per_class):
            draw(root / folder / f"{folder}_{i:02d}.png", shape, colour, (28, 28) if i % 2 else (40, 30), rng)
    return root


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """ImageFolder -> zoo -> generator -> a generated 3-class model, all through `tina` commands."""
    tmp = tmp_path_factory.mktemp("own")
    mp = pytest.MonkeyPatch()
    mp.setenv("TINA_CACHE", str(tmp / "cache"))  # the rendered dataset's cache, not the user's
    images = write_imagefolder(tmp / "shapes")
    zoo, run, model = tmp / "zoo", tmp / "run", tmp / "model"
    names = "{" + ", ".join(f"{k}: {v}" for k, v in NAMES.items()) + "}"
    assert cli(["zoo", "build", str(CONFIGS / "zoo" / "imagefolder.yaml"), f"dataset.root={images}",
                f"dataset.class_names={names}", f"out={zoo}", *TINY_ZOO]) == 0  # fmt: skip
    assert cli(["train", str(CONFIGS / "train" / "imagefolder.yaml"), f"zoo={zoo}", f"out={run}", *TINY_TRAIN]) == 0
    assert cli(["generate", "--checkpoint", str(run / "bundle"), "--classes", "green triangle", "red square",
                "blue circle", "-o", str(model)]) == 0  # fmt: skip
    yield {"images": images, "zoo": zoo, "run": run, "model": model, "tmp": tmp}
    mp.undo()


def test_imagefolder_chain_names_classes_and_predicts(own_run, capsys):
    from tina.training.datasets import load_dataset
    from tina.export import load_generated

    import json

    man = json.loads((own_run["zoo"] / "manifest.json").read_text())
    assert man["dataset"]["classes"] == ["blue circle", "green triangle", "yellow cross", "purple bar", "red square"]
    assert man["dataset"]["size"] == 32 and man["dataset"]["class_names"] == NAMES
    ds = load_dataset(man["dataset"])  # the zoo's record alone reloads the same images
    assert ds.image.size == 32 and ds.image.channels == 3 and len(ds.test_y) > 0
    net = load_generated(own_run["model"])
    assert net.classes == ["green triangle", "red square", "blue circle"]
    files = sorted((own_run["images"] / "c_green").glob("*.png"))[:2]
    capsys.readouterr()
    assert cli(["predict", str(own_run["model"]), *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert all(str(f) in out for f in files) and "green triangle" in out


def _predicted(out: str) -> list[str]:
    """Class names from `tina predict` lines: 'PATH: CLASS (p)   [...]'."""
    return [re.match(r".*?: (.+?) \(\d\.\d+\)", line).group(1) for line in out.splitlines() if line.strip()]


def test_every_path_sees_the_same_pixels(own_run, capsys):
    """Training render, evaluation, tina predict, the demo and model.pt2 agree exactly on the same images."""
    from serve.app import Demo
    from tina.training.accuracy import task_test_set
    from tina.training.datasets import load_dataset
    from tina.export import load_generated
    from tina.images import load_image
    from tina.sample import Tina

    man_path = own_run["zoo"] / "manifest.json"
    import json

    ds = load_dataset(json.loads(man_path.read_text())["dataset"])
    net = load_generated(own_run["model"])
    assert net.image == ds.image  # the generated model carries the dataset's preprocessing
    class_ids = [ds.classes.index(c) for c in net.classes]

    # 1. The user's own source files (28 px: scaled up; 40x30: scaled down) give exactly a training array.
    train_rows = {ds.train_x[i].tobytes() for i in range(len(ds.train_x))} | {ds.test_x[i].tobytes() for i in range(len(ds.test_x))}
    for f in sorted(own_run["images"].rglob("*.png"))[::7]:
        x = load_image(f, net.image)  # what tina predict and the demo read
        arr = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert arr.tobytes() in train_rows, f

    # 2. The evaluation's test images, saved as PNGs, come back bit-identical through predict's reader.
    x_eval, y_eval = task_test_set(ds, class_ids)  # what tina eval and training validation score
    pngs = []
    for i, img in enumerate((x_eval.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()):
        pngs.append(own_run["tmp"] / "test_pngs" / f"{i:03d}.png")
        pngs[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(pngs[-1])
    x_pred = torch.stack([load_image(p, net.image) for p in pngs])
    assert torch.equal(x_pred, x_eval)

    # 3. The demo reads files and arrays the same way.
    demo = Demo(Tina.from_pretrained(own_run["run"] / "bundle"), workdir=own_run["tmp"] / "demo")
    assert torch.equal(demo.read_image(str(pngs[0])), x_eval[0])
    assert torch.equal(demo.read_image(np.asarray(Image.open(pngs[1]))), x_eval[1])

    # 4. tina predict's accuracy on those PNGs is the evaluation's accuracy.
    with torch.no_grad():
        eval_pred = net(x_eval).argmax(-1)
    capsys.readouterr()
    assert cli(["predict", str(own_run["model"]), *map(str, pngs)]) == 0
    predicted = _predicted(capsys.readouterr().out)
    assert predicted == [net.classes[i] for i in eval_pred.tolist()]
    acc_eval = (eval_pred == y_eval).float().mean().item()
    acc_predict = np.mean([p == net.classes[int(y)] for p, y in zip(predicted, y_eval)])
    assert acc_predict == pytest.approx(acc_eval, rel=1e-6)  # float32 vs float64 of the same count

    # 5. The exported program takes the same tensors and gives the same answers.
    program = torch.export.load(own_run["model"] / "model.pt2").module()
    with torch.no_grad():
        assert torch.equal(program(x_pred).argmax(-1), eval_pred)


def test_fashion_mnist_test_pngs_read_back_exactly(tmp_path):
    """Grey, light-on-black data: no test image is inverted or shifted by predict's reader (the old
    mean-brightness rule flipped 548 of the 10,000)."""
    from tina.training.datasets import load_dataset
    from tina.images import load_image
    from tina.targets import ImageSpec

    ds = load_dataset("fashion-mnist")
    # the shipped checkpoint's spec, written before `background` existed
    spec = ImageSpec.from_dict({"channels": 1, "size": 28, "mean": [0.286], "std": [0.353]})
    x, _ = ds.tensors("test")
    bright = np.flatnonzero(ds.test_x.reshape(len(ds.test_x), -1).mean(1) > 127.5)[:20]
    idx = np.concatenate([np.arange(20), bright])
    for i in idx:
        Image.fromarray(ds.test_x[i, :, :, 0]).save(tmp_path / f"{i}.png")
        assert torch.equal(load_image(tmp_path / f"{i}.png", spec), x[i]), i
    # A dark drawing on white paper (a photo of a shoe) is turned into a light one on black.
    Image.fromarray(255 - ds.test_x[0, :, :, 0]).save(tmp_path / "paper.png")
    assert torch.equal(load_image(tmp_path / "paper.png", spec), x[0])


def test_fashion_mnist_polarity_survives_loading_the_checkpoint_and_a_generated_folder(tmp_path):
    """The light-on-black polarity (background 0) is what `tina predict` matches a user's photo to. Loading
    a bundle or a generated folder once dropped it (background 255): a shoe photographed on white paper was
    then fed to the model as a dark shoe on white. The shipped checkpoint, a copy made by
    `python -m tina.bundle` and a generated, saved and reloaded model all keep 0."""
    from tina.bundle import load_bundle, main as bundle_main
    from tina.export import load_generated, save_generated
    from tina.registry import resolve_checkpoint
    from tina.sample import Tina

    shipped = load_bundle(resolve_checkpoint("fashion-mnist"))
    assert shipped.image.background == 0 and not shipped.image.crop
    assert bundle_main([str(resolve_checkpoint("fashion-mnist")), str(tmp_path / "copy")]) == 0
    assert load_bundle(tmp_path / "copy").image.background == 0
    net = Tina(shipped).generate(classes=["sneaker", "sandal"])
    save_generated(net, tmp_path / "model")
    assert load_generated(tmp_path / "model").image.background == 0
