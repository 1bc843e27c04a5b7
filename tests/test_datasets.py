"""Tests for tina.training.datasets: loaders, the safe renderer, the clip-art curation and its cache.

Real data (Debian's dataset-fashion-mnist and openclipart-png) is used where installed and the
test is skipped otherwise; the cache and split machinery is also tested on small generated trees.
The real clip-art dataset goes to the user's cache (`$TINA_CACHE/datasets`), so it is rendered
once per machine (about two minutes on two cores) and read back in a second afterwards.
"""

import gzip
import json
import logging
import os
import struct
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tina import images
from tina.errors import TinaError
from tina.images import render
from tina.targets import ImageSpec
from tina.training import datasets as D
from tina.training.datasets import ClassRule, ClipartCuration, ImageDataset, build_clipart, load_dataset
from tina.training.datasets import clipart as clipart_module
from tina.training.datasets import download, fashion_mnist
from tina.training.datasets import render as render_module

HAVE_FMNIST = fashion_mnist._find_idx_files(os.environ.get("TINA_FASHION_MNIST") or D.FASHION_MNIST_ROOT) is not None
HAVE_CLIPART = os.path.isdir(os.environ.get("TINA_CLIPART") or D.CLIPART_ROOT)


# ---------------------------------------------------------------------------------------------
# helpers


def write_idx(path, array: np.ndarray):
    """An IDX file as in the MNIST distribution: zero, type 0x08 (uint8), ndim, big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, n_train=20, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return folder


def drawing(path, shape: str, color, size=(40, 30), seed=0):
    """A small RGBA clip-art stand-in: a shape on a transparent background with noisy hidden RGB."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    pixels[..., :3] = rng.integers(0, 256, (size[1], size[0], 3))  # garbage under alpha 0
    im = Image.fromarray(pixels, "RGBA")
    box = [4 + seed % 5, 3, size[0] - 5, size[1] - 4]
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=(*color, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture(scope="module")
def clipart_tree(tmp_path_factory):
    """A tiny openclipart-like tree: two real classes, one too small, plus files that must be skipped."""
    root = tmp_path_factory.mktemp("openclipart")
    for i in range(36):
        drawing(root / "food" / "fruit" / f"apple_{i:02d}.png", "ellipse", (200, 30 + i, 40), seed=i)
    for i in range(30):
        drawing(root / "shapes" / "jigsaw" / f"piece_{i:02d}.png", "rect", (30, 40 + i, 220), seed=i)
    drawing(root / "shapes" / "jigsaw" / "piece_bw.png", "rect", (0, 0, 0))  # twin of piece.png below
    drawing(root / "shapes" / "jigsaw" / "piece.png", "rect", (30, 40, 220))
    for i in range(2):
        drawing(root / "misc" / f"tiny_{i}.png", "rect", (0, 0, 0), seed=i)
    (root / "food" / "fruit" / "apple_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "food" / "fruit" / "apple_blank.png")
    drawing(root / "food" / "fruit" / "apple_huge.png", "ellipse", (250, 0, 0), size=(400, 300))
    os.symlink("../../food/fruit/apple_00.png", root / "shapes" / "jigsaw" / "link_to_apple.png")
    return root


TINY_CURATION = ClipartCuration(
    rules=(
        ClassRule("fruit", ("food",), keywords=r"apple"),
        ClassRule("puzzle piece", ("shapes/jigsaw",)),
        ClassRule("tiny", ("misc",)),
    ),
    min_images=5,
    max_pixels=100_000,  # apple_huge (120,000 px) is over budget
    exclude_files=(),
)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
    if not HAVE_FMNIST:
        pytest.skip("dataset-fashion-mnist is not installed")
    return load_dataset("fashion-mnist")


def test_fashion_mnist_shapes_and_labels(fmnist):
    assert fmnist.train_x.shape == (60000, 28, 28, 1) and fmnist.train_x.dtype == np.uint8
    assert fmnist.test_x.shape == (10000, 28, 28, 1) and fmnist.test_x.dtype == np.uint8
    assert fmnist.train_y.dtype == np.int64 and fmnist.test_y.dtype == np.int64
    assert fmnist.classes[0] == "t-shirt" and fmnist.classes[-1] == "ankle boot" and len(fmnist.classes) == 10
    assert np.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert set(np.unique(fmnist.test_y)) == set(range(10))
    assert fmnist.image.channels == 1 and fmnist.image.size == 28
    assert fmnist.image.mean[0] == pytest.approx(0.286, abs=2e-3)
    assert fmnist.image.std[0] == pytest.approx(0.353, abs=2e-3)


def test_tensors_range_shape_and_index(fmnist):
    x, y = fmnist.tensors("test", idx=np.arange(100))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert torch.equal(y, torch.from_numpy(fmnist.test_y[:100]))
    x2, y2 = fmnist.tensors("test", idx=torch.tensor([5, 3]))
    assert torch.equal(x2[1], x[3]) and y2.tolist() == [fmnist.test_y[5], fmnist.test_y[3]]
    with pytest.raises(TinaError, match="train"):
        fmnist.tensors("validation")


def test_fashion_mnist_from_a_given_root_and_env(tmp_path, monkeypatch):
    folder = fake_fashion_mnist(tmp_path / "fm")
    ds = load_dataset("fashion-mnist", root=str(folder))
    assert ds.train_x.shape == (20, 28, 28, 1) and ds.test_y.tolist() == list(range(10))
    monkeypatch.setenv("TINA_FASHION_MNIST", str(folder))
    assert load_dataset("fashion-mnist").train_x.shape == (20, 28, 28, 1)


def test_fashion_mnist_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(TinaError) as err:
        load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "dataset.root=PATH" in str(err.value)


def test_fashion_mnist_fallback_download_never_hangs(tmp_path, monkeypatch):
    monkeypatch.delenv("TINA_FASHION_MNIST", raising=False)
    monkeypatch.setenv("TINA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_ROOT", str(tmp_path / "not-installed"))
    monkeypatch.setattr(fashion_mnist, "_reachable", lambda host, port, timeout=3.0: False)  # offline
    with pytest.raises(TinaError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")

    import torchvision.datasets

    class BrokenFashionMNIST:
        mirrors = torchvision.datasets.FashionMNIST.mirrors

        def __init__(self, *args, **kwargs):
            raise OSError("connection reset")

    monkeypatch.setattr(fashion_mnist, "_reachable", lambda host, port, timeout=3.0: True)  # online, but it fails
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", BrokenFashionMNIST)
    with pytest.raises(TinaError, match="dataset.root=PATH"):
        load_dataset("fashion-mnist")


def test_reachable_is_bounded():
    assert download._reachable("localhost", 9, timeout=1.0) is False  # discard port: nothing listens
    assert download._reachable(None, 80) is False


def test_corrupt_idx_is_a_tina_error(tmp_path):
    folder = fake_fashion_mnist(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(TinaError, match="cannot read"):
        load_dataset("fashion-mnist", root=str(folder))


# ---------------------------------------------------------------------------------------------
# ImageDataset


def toy_dataset():
    x = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    spec = ImageSpec(3, 4, (0.5,) * 3, (0.25,) * 3)
    return ImageDataset("toy", ["a", "b", "c"], x, y, x[:3], y[:3], spec)


def test_subset_relabels_in_the_given_order():
    sub = toy_dataset().subset([2, 0])
    assert sub.classes == ["c", "a"]
    assert sub.train_y.tolist() == [1, 0, 1, 0] and sub.test_y.tolist() == [1, 0]
    with pytest.raises(TinaError):
        toy_dataset().subset([0, 0])


def test_dataset_checks_its_arrays():
    ds = toy_dataset()
    with pytest.raises(ValueError, match="labels outside"):
        ImageDataset("toy", ["a"], ds.train_x, ds.train_y, ds.test_x, ds.test_y, ds.image)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("toy", ds.classes, ds.train_x.astype(np.float32), ds.train_y, ds.test_x, ds.test_y, ds.image)
    assert "toy" in repr(ds) and "train=6" in repr(ds)


def test_unknown_names_and_missing_data(tmp_path):
    with pytest.raises(TinaError, match="clipart"):
        load_dataset("mnist")
    with pytest.raises(TinaError, match="dataset.download=true"):
        load_dataset("cifar10", root=str(tmp_path))
    (tmp_path / "cifar-100-python").mkdir()  # present but empty
    with pytest.raises(TinaError, match="cifar-100-python/train is missing"):
        load_dataset("cifar100", root=str(tmp_path))
    with pytest.raises(TinaError, match="apt-get install openclipart-png"):
        load_dataset("clipart", root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_composites_alpha_on_white_and_keeps_aspect(tmp_path):
    im = np.zeros((50, 100, 4), dtype=np.uint8)  # black RGB everywhere, opaque only in a red band
    im[10:40, :, :] = (255, 0, 0, 255)
    Image.fromarray(im, "RGBA").save(tmp_path / "band.png")
    out = render(str(tmp_path / "band.png"), D.render_frame(32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:8] == 255).all() and (out[-8:] == 255).all()  # 2:1 image: padded top and bottom
    assert out[..., 0].min() > 200  # only white and red: the black under alpha 0 never bled in
    assert tuple(out[16, 16]) == (255, 0, 0)


def test_render_crops_to_the_drawing(tmp_path):
    im = np.zeros((200, 200, 4), dtype=np.uint8)
    im[90:110, 80:120] = (0, 0, 200, 255)  # a small blue bar in a big transparent canvas
    Image.fromarray(im, "RGBA").save(tmp_path / "small.png")
    loose = render(str(tmp_path / "small.png"), D.render_frame(32))
    tight = render(str(tmp_path / "small.png"), D.render_frame(32, crop=True))
    blue = lambda x: ((x[..., 2] > 150) & (x[..., 0] < 100)).sum()  # noqa: E731
    assert blue(loose) < 40 and blue(tight) > 400  # 40x20 fills the 32 px width when cropped


def test_render_in_bands_matches_one_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (900, 700, 4), dtype=np.uint8)
    Image.fromarray(im, "RGBA").save(tmp_path / "noise.png")
    whole = render(str(tmp_path / "noise.png"), D.render_frame(32, crop=True), 10**9)
    monkeypatch.setattr(images, "_BAND_PIXELS", 20_000)  # forces ~30 bands
    banded = render(str(tmp_path / "noise.png"), D.render_frame(32, crop=True), 10**9)
    assert np.array_equal(whole, banded)


def test_render_refuses_images_over_the_pixel_budget(tmp_path):
    Image.new("L", (300, 300), 0).save(tmp_path / "big.png")
    img, err = render_module._render_job((str(tmp_path / "big.png"), D.render_frame(32, crop=True), 50_000))
    assert img is None and "budget" in err
    assert render_module.Image.MAX_IMAGE_PIXELS != 50_000  # the limit is restored after the job


def test_group_key_joins_twins():
    assert D.group_key("food/pie_apple_bw.png") == D.group_key("food/pie_apple.png")
    assert D.group_key("aiga_bar1.png") == D.group_key("aiga_bar_.png")
    assert D.group_key("cone1_bw_ganson.png") == D.group_key("cone1_ganson.png")
    assert D.group_key("clock01.png") != D.group_key("clock02.png")


def test_split_gives_every_class_train_and_test():
    keys = [f"f{i}" for i in range(30)]
    labels = np.array([0] * 2 + [1] * 28)
    test = D.split_test(keys, labels, 0.2)
    for c in (0, 1):
        assert test[labels == c].any() and (~test[labels == c]).any()
    assert np.array_equal(test, D.split_test(keys, labels, 0.2))


# ---------------------------------------------------------------------------------------------
# Clip-art build and cache, on a generated tree


def test_clipart_build_skips_bad_files_and_caches(clipart_tree, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="tina.training.datasets")
    ds = build_clipart(str(clipart_tree), cache_dir=tmp_path, curation=TINY_CURATION, workers=2)
    assert ds.classes == ["fruit", "puzzle piece"]  # "tiny" has 2 < 5 images and is dropped
    assert ds.train_x.shape[1:] == (32, 32, 3) and ds.image.channels == 3 and ds.image.size == 32
    counts = np.bincount(np.concatenate([ds.train_y, ds.test_y]))
    assert counts.tolist() == [36, 32]  # the jigsaw symlink is apple_00 again, counted once (as fruit)
    for c in range(2):
        assert (ds.train_y == c).any() and (ds.test_y == c).any()
    assert "skipped 3 of" in caplog.text  # corrupt, blank, over budget

    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind
    with np.load(files[0]) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["dropped"] == {"tiny": 2}
    twins = [f for f in meta["train_files"] + meta["test_files"] if f.startswith("shapes/jigsaw/piece")]
    same_side = {f in meta["test_files"] for f in twins if f.endswith(("piece.png", "piece_bw.png"))}
    assert len(same_side) == 1  # colour and black-and-white twins share a side of the split

    def no_render(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(clipart_module, "_render_many", no_render)
    caplog.clear()
    again = build_clipart(str(clipart_tree), cache_dir=tmp_path, curation=TINY_CURATION)
    assert "from cache" in caplog.text
    assert np.array_equal(again.train_x, ds.train_x) and np.array_equal(again.test_y, ds.test_y)
    assert again.image == ds.image and again.classes == ds.classes


def test_clipart_build_is_deterministic(clipart_tree, tmp_path):
    a = build_clipart(str(clipart_tree), cache_dir=tmp_path / "a", curation=TINY_CURATION, workers=1)
    b = build_clipart(str(clipart_tree), cache_dir=tmp_path / "b", curation=TINY_CURATION, workers=2)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_clipart_plan_folds_symlinks_and_caps(clipart_tree):
    plan = D.plan_clipart(str(clipart_tree), replace(TINY_CURATION, max_images=10))
    assert Counter(plan.labels) == {"fruit": 10, "puzzle piece": 10, "tiny": 2}
    assert plan.capped == {"fruit": 29, "puzzle piece": 22} and plan.unassigned == 0
    assert len(set(plan.paths)) == len(plan.paths)


def test_clipart_cache_key_follows_rules(clipart_tree, tmp_path):
    build_clipart(str(clipart_tree), cache_dir=tmp_path, curation=TINY_CURATION)
    build_clipart(str(clipart_tree), cache_dir=tmp_path, curation=replace(TINY_CURATION, min_images=2))
    assert len(list(tmp_path.glob("clipart-*.npz"))) == 2


def test_unreadable_cache_is_rebuilt(clipart_tree, tmp_path):
    ds = build_clipart(str(clipart_tree), cache_dir=tmp_path, curation=TINY_CURATION)
    (cache,) = tmp_path.glob("clipart-*.npz")
    cache.write_bytes(b"truncated")
    again = build_clipart(str(clipart_tree), cache_dir=tmp_path, curation=TINY_CURATION)
    assert np.array_equal(again.train_x, ds.train_x)


# ---------------------------------------------------------------------------------------------
# The real clip-art dataset (shared user cache)


@pytest.fixture(scope="module")
def clipart():
    if not HAVE_CLIPART:
        pytest.skip("openclipart-png is not installed")
    return load_dataset("clipart")  # rendered into the user cache on the first run only


def test_clipart_has_many_classes_each_with_train_and_test(clipart):
    assert len(clipart.classes) >= 30 and len(set(clipart.classes)) == len(clipart.classes)
    assert all(c == c.lower() and c.replace(" ", "").replace("-", "").isalpha() for c in clipart.classes)
    for c in range(len(clipart.classes)):
        assert (clipart.train_y == c).sum() >= 20, clipart.classes[c]
        assert (clipart.test_y == c).sum() >= 4, clipart.classes[c]
    assert clipart.train_x.shape[1:] == (32, 32, 3) and clipart.train_x.dtype == np.uint8
    assert clipart.image.channels == 3 and clipart.image.size == 32
    assert all(0.5 < m < 0.95 for m in clipart.image.mean) and all(0.1 < s < 0.5 for s in clipart.image.std)
    x, y = clipart.tensors("train", idx=np.arange(8))
    assert x.shape == (8, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == torch.int64


def test_clipart_second_load_reads_the_cache(clipart, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="tina.training.datasets")

    def no_render(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(clipart_module, "_render_many", no_render)
    again = load_dataset("clipart")
    assert "loaded clipart from cache" in caplog.text
    assert again.classes == clipart.classes and again.image == clipart.image
    assert np.array_equal(again.train_x, clipart.train_x) and np.array_equal(again.test_y, clipart.test_y)


@pytest.mark.slow
def test_clipart_rebuild_from_scratch_matches_the_cache(clipart, tmp_path):
    """A fresh render (about two minutes) must reproduce the cached dataset bit for bit."""
    fresh = load_dataset("clipart", cache_dir=str(tmp_path))
    assert fresh.classes == clipart.classes
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(fresh, field), getattr(clipart, field)), field


# ---------------------------------------------------------------------------------------------
# Image folders


def test_imagefolder_renders_and_splits(tmp_path):
    root = tmp_path / "pets"
    for cls, shape, color in (("cat_face", "ellipse", (200, 120, 0)), ("dog", "rect", (90, 60, 30))):
        for i in range(6):
            drawing(root / cls / f"img{i}.png", shape, color, size=(64, 48), seed=i)
    Image.new("RGB", (80, 60), (10, 200, 10)).save(root / "dog" / "photo.jpg")
    ds = load_dataset("imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == ["cat face", "dog"]
    assert len(ds.train_y) + len(ds.test_y) == 13 and ds.train_x.shape[1:] == (32, 32, 3)
    assert set(ds.train_y.tolist()) == {0, 1} and set(ds.test_y.tolist()) == {0, 1}
    again = load_dataset("imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(again.train_x, ds.train_x)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(TinaError, match="does not exist"):
        load_dataset("imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(TinaError, match="dataset.root=PATH"):
        load_dataset("imagefolder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinaError, match="subfolder"):
        load_dataset("imagefolder", root=str(tmp_path / "empty"))
