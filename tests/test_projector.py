"""Image prompts: the projector learns, survives a bundle round trip, and refuses what it cannot use."""

import json

import pytest
import torch
import torch.nn.functional as F

from tina.bundle import load_bundle
from tina.errors import TinaError
from tina.projector import ImageProjector, ProjectorConfig, embed_class_images, load_projector
from tina.sample import Tina
from tina.targets import ImageSpec
from tina.training.datasets import ImageDataset
from tina.training.projector import attach_projector, augment, main, make_config, train_projector
from tina.training.testing import random_bundle

# Small enough for ~10 s on two CPU cores, big enough to learn clearly above chance (0.1).
TINY = dict(train_limit=2000, test_limit=1000, epochs=2, width=8, batch_size=64, lr=5e-3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The projectors here are tiny: a second OpenMP thread only adds sync overhead (tens of times on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fashion(fashion_mnist):
    return fashion_mnist


@pytest.fixture(scope="module")
def bundle_with_projector(tmp_path_factory, fashion):
    path = random_bundle(tmp_path_factory.mktemp("gen") / "bundle")
    before = load_bundle(path)
    attach_projector(path, **TINY)
    return path, before


def class_images(dataset, c, n, offset=0):
    idx = (dataset.test_y == c).nonzero()[0][offset : offset + n]
    return dataset.tensors("test", idx)[0]  # (n, 1, 28, 28)


def toy_dataset(n_per_class=40):
    """Three 16x16 grey classes a small CNN separates at once: horizontal bars, vertical bars, a square."""
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for c in range(3):
        x = torch.zeros(n_per_class, 16, 16)
        for i in range(n_per_class):
            o = int(torch.randint(0, 4, (1,), generator=g))
            if c == 0:
                x[i, o::4, :] = 1
            elif c == 1:
                x[i, :, o::4] = 1
            else:
                x[i, 4 + o // 2 : 10 + o // 2, 4:10] = 1
        xs.append(x)
        ys.append(torch.full((n_per_class,), c))
    x = (torch.cat(xs) * 255).to(torch.uint8)[..., None].numpy()  # (N, 16, 16, 1)
    y = torch.cat(ys).numpy().astype("int64")
    test = torch.arange(len(y)) % 4 == 0
    return ImageDataset("toy", ["bars", "stripes", "square"], x[~test], y[~test], x[test], y[test],
                        ImageSpec(1, 16, (0.3,), (0.45,)))


def test_train_projector_returns_a_loadable_projector():
    ds = toy_dataset()
    class_emb = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)  # (K, E)
    out = train_projector(ds, class_emb, make_config(dict(epochs=6, width=4, batch_size=16, max_shift=1)), text_encoder="toy")
    cfg, state, metrics = out  # unpacks like a tuple, fields have names
    assert out.metrics is metrics and metrics["test_images"] == len(ds.test_y)
    assert metrics["test_top1"] > 0.8, metrics  # chance is 1/3
    assert cfg["embed_dim"] == 16 and cfg["classes"] == ds.classes and cfg["text_encoder"] == "toy"
    assert cfg["image"] == ds.image.to_dict() and cfg["metrics"] == metrics
    model = ImageProjector.from_config(ProjectorConfig.from_dict(json.loads(json.dumps(cfg))))
    model.load_state_dict(state, strict=True)
    z = model(ds.tensors("test", [0, 1, 2])[0])  # (3, E)
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_held_out_classes_are_reported():
    ds = toy_dataset(12)
    class_emb = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    _, _, metrics = train_projector(ds, class_emb, make_config(dict(epochs=1, width=4, held_out_classes=["square"])))
    assert metrics["held_out"]["classes"] == [2] and metrics["train_images"] == 18  # 2 classes x 9 train images
    with pytest.raises(TinaError, match="not classes of toy"):
        train_projector(ds, class_emb, make_config(dict(epochs=1, held_out_classes=["circle"])))


def test_short_training_learns(bundle_with_projector):
    m = load_bundle(bundle_with_projector[0]).projector_config["metrics"]
    assert m["test_images"] == 1000 and m["train_images"] == 2000
    assert m["test_top1"] > 0.35, m  # chance is 0.1; the test images were never trained on
    assert m["cos_own"] > m["cos_other"] + 0.05
    assert set(m["few_shot"]) == {"1", "5"}


def test_bundle_round_trip_and_image_prompts(bundle_with_projector, fashion):
    path, before = bundle_with_projector
    b = load_bundle(path)
    assert b.projector and b.projector_config["format"] == "tina-projector/1"
    assert b.projector_config["text_encoder"] == "minilm"
    # everything else in the folder is unchanged
    assert b.vocab == before.vocab and torch.equal(b.vocab_emb, before.vocab_emb) and b.meta == before.meta
    for k, v in before.dit.state_dict().items():
        assert torch.equal(v, b.dit.state_dict()[k]), k
    assert json.loads((path / "bundle.json").read_text())["projector"]["dataset"] == "fashion-mnist"

    tina = Tina(b)
    sandal, sneaker = b.vocab.index("sandal"), b.vocab.index("sneaker")
    model = tina.generate(classes=["sandal", "sneaker"], images={"sandal": class_images(fashion, sandal, 3)}, seed=1)
    assert model.classes == ["sandal", "sneaker"]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 2)
    task = tina.make_task(classes=["sandal", "sneaker"], images={"sneaker": class_images(fashion, sneaker, 5)})
    assert not torch.equal(task.cond[1], b.vocab_emb[sneaker])  # the image embedding replaced the text one

    # Per class: the embedding of 5 example images is nearer its own name than the others, on average.
    own, other = [], []
    for c in range(len(b.vocab)):
        z = tina.embed_images(class_images(fashion, c, 5, offset=10))  # (E,)
        assert z.shape == (384,) and abs(float(z.norm()) - 1) < 1e-5
        sims = b.vocab_emb @ z  # (V,)
        own.append(float(sims[c]))
        other.append(float(torch.cat([sims[:c], sims[c + 1 :]]).mean()))
    assert sum(own) / len(own) > sum(other) / len(other) + 0.05, (own, other)


def test_projector_loads_strictly(bundle_with_projector):
    path, _ = bundle_with_projector
    b = load_bundle(path)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(load_projector(b)(x), load_projector(b)(x))
    b.projector = {k: v for k, v in b.projector.items() if not k.startswith("head.")}
    with pytest.raises(TinaError, match="do not match"):
        load_projector(b)
    b = load_bundle(path)
    b.text_encoder = "open_clip:ViT-B-32/random"
    with pytest.raises(TinaError, match="python -m tina.training.projector"):
        load_projector(b)


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 28, 28), "1-channel"),
    ((2, 1, 32, 32), "28x28"),
    ((28, 28), "shape"),
    ((0, 1, 28, 28), "at least one"),
])  # fmt: skip
def test_bad_images_are_refused(bundle_with_projector, shape, match):
    tina = Tina(load_bundle(bundle_with_projector[0]))
    with pytest.raises(TinaError, match=match):
        tina.embed_images(torch.rand(*shape))


def test_pixel_range_and_uint8(bundle_with_projector):
    tina = Tina(load_bundle(bundle_with_projector[0]))
    with pytest.raises(TinaError, match=r"\[0, 1\]"):
        tina.embed_images(torch.rand(2, 1, 28, 28) * 255)
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.allclose(tina.embed_images(x), tina.embed_images(x.float() / 255), atol=1e-6)
    # a list of single images works like a batch
    assert torch.allclose(tina.embed_images(list(x.float() / 255)), tina.embed_images(x.float() / 255), atol=1e-6)


def test_no_projector_no_image_tower(tmp_path):
    tina = Tina(load_bundle(random_bundle(tmp_path / "bundle")))
    with pytest.raises(TinaError, match="CLIP weights.*python -m tina.training.projector"):
        tina.embed_images(torch.rand(2, 1, 28, 28))
    with pytest.raises(TinaError, match="projector"):
        tina.generate(classes=["sandal", "sneaker"], images={"sandal": torch.rand(1, 1, 28, 28)})


def test_image_tower_is_preferred(tmp_path):
    """An encoder with an image tower (CLIP) embeds the images itself: mean, then re-normalised."""

    class FakeClip:
        has_image_tower = True

        def encode_images(self, x):
            assert x.shape == (2, 1, 28, 28)
            return torch.eye(384)[:2]  # (2, E)

    tina = Tina(load_bundle(random_bundle(tmp_path / "bundle")))
    tina._encoder = FakeClip()
    z = embed_class_images(tina, torch.rand(2, 1, 28, 28))
    assert torch.allclose(z[:2], torch.full((2,), 2**-0.5)) and z[2:].abs().sum() == 0


def test_attach_checks_vocabulary(tmp_path, fashion):
    path = random_bundle(tmp_path / "bundle", classes=["cat", "dog", "horse"], k_max=3)
    with pytest.raises(TinaError, match="not in the generator's vocabulary"):
        attach_projector(path, epochs=0)


def test_config_errors():
    with pytest.raises(TinaError, match="bad projector config"):
        make_config({"no_such_key": 1})
    with pytest.raises(TinaError, match="temperature"):
        make_config(["temperature=0"])
    assert make_config(["epochs=2", "held_out_classes=[sandal]"]).held_out_classes == ["sandal"]


def test_augment_keeps_shape_and_pixels():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    y = augment(x, 2, True, gen)
    assert y.shape == x.shape and y.min() >= x.min() and y.max() <= x.max()
    assert torch.equal(augment(x, 0, False, gen), x)


def test_projector_resizes_large_inputs():
    m = ImageProjector(ImageSpec(3, 224, (0.5,) * 3, (0.25,) * 3), 16, width=4, hidden=8, max_input_size=32)
    z = m(torch.rand(2, 3, 224, 224))
    assert z.shape == (2, 16) and torch.allclose(F.normalize(z, dim=-1), z)


def test_main_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "ProjectorConfig" in capsys.readouterr().out


def test_main_reports_user_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "unknown checkpoint" in capsys.readouterr().err


def test_bundle_copy_takes_the_projector_of_another_bundle(bundle_with_projector, tmp_path, capsys):
    """`python -m tina.bundle SRC DEST --half --projector-from B`: a retrained generator keeps B's projector."""
    from tina.bundle import main as bundle_main

    with_proj, _ = bundle_with_projector
    plain = random_bundle(tmp_path / "plain", seed=1)
    assert not load_bundle(plain).projector
    assert bundle_main([str(plain), str(tmp_path / "out"), "--half", "--projector-from", str(with_proj)]) == 0
    out, src = load_bundle(tmp_path / "out"), load_bundle(with_proj)
    assert out.projector.keys() == src.projector.keys()
    assert all(torch.equal(out.projector[k], src.projector[k]) for k in src.projector)
    assert out.projector_config == src.projector_config
    other = random_bundle(tmp_path / "other", classes=["cat", "dog"], k_max=2)
    assert bundle_main([str(other), str(tmp_path / "out2"), "--projector-from", str(with_proj)]) == 2
    assert "another text encoder, dataset or vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
