"""Text encoders: shapes, unit norm, determinism, MiniLM semantics, open_clip plumbing and offline failures."""

import re
import time

import pytest
import torch

from tina import text
from tina.errors import TinaError
from tina.text import build_text_encoder, get_text_encoder, preprocess_images

CLIP_RANDOM = "open_clip:ViT-B-32/random"


@pytest.fixture(scope="module")
def minilm():
    return get_text_encoder("minilm").load()


@pytest.fixture(scope="module")
def clip():
    return get_text_encoder(CLIP_RANDOM).load()


def cos(a, b):
    return float((a * b).sum())


def test_minilm_shapes_norm_determinism(minilm):
    assert minilm.name == "minilm" and minilm.dim == 384 and not minilm.has_image_tower
    e = minilm.encode(["sandal", "a photo of a sneaker", ""])
    assert e.shape == (3, 384) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(e, minilm.encode(["sandal", "a photo of a sneaker", ""]))
    # batch composition (padding) does not change a row beyond float noise
    assert torch.allclose(e[0], minilm.encode(["sandal"])[0], atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_semantics(minilm):
    sandal, straps, coat = minilm.encode(["sandal", "an open shoe held on by straps", "a warm winter coat"])
    assert cos(sandal, straps) > cos(sandal, coat)


def test_minilm_has_no_image_tower(minilm):
    with pytest.raises(TinaError, match="no image tower"):
        minilm.encode_images(torch.rand(1, 3, 8, 8))


def test_encode_rejects_a_bare_string(minilm):
    with pytest.raises(TypeError):
        minilm.encode("sandal")


def test_encoders_are_cached_per_process():
    assert get_text_encoder("minilm") is get_text_encoder("minilm", device="cpu")
    assert get_text_encoder("minilm") is not build_text_encoder("minilm")


def test_open_clip_random_text_and_images(clip):
    assert clip.name == CLIP_RANDOM and clip.dim == 512 and clip.has_image_tower
    t = clip.encode(["a photo of a cat", "a dog"])
    assert t.shape == (2, 512) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(t, clip.encode(["a photo of a cat", "a dog"]))
    rgb = clip.encode_images(torch.rand(2, 3, 32, 48))
    grey = clip.encode_images(torch.rand(2, 1, 28, 28))  # Fashion-MNIST-like input is expanded to RGB
    assert rgb.shape == (2, 512) and grey.shape == (2, 512)
    assert torch.allclose(rgb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert clip.encode_images(torch.zeros(0, 3, 8, 8)).shape == (0, 512)


def test_open_clip_random_weights_are_seeded(clip):
    again = build_text_encoder(CLIP_RANDOM)  # a second, uncached build
    assert torch.allclose(again.encode(["a cat"]), clip.encode(["a cat"]), atol=1e-6)


@pytest.mark.slow
def test_open_clip_local_checkpoint_round_trip(tmp_path):
    small = build_text_encoder("open_clip:ViT-S-32-alt/random").load()
    path = tmp_path / "ckpt.bin"
    torch.save(small._model.state_dict(), path)
    loaded = build_text_encoder(f"open_clip:ViT-S-32-alt/{path}")
    assert loaded.checkpoint == str(path)
    assert torch.allclose(loaded.encode(["a cat"]), small.encode(["a cat"]), atol=1e-6)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_preprocess_images(resize_mode):
    cfg = {"size": (224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": resize_mode, "fill_color": 0}
    x = preprocess_images(torch.rand(2, 3, 30, 60), cfg)
    assert x.shape == (2, 3, 224, 224)
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6  # [0, 1] through (x - 0.5) / 0.5 stays in [-1, 1]


def test_hub_tag_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(TinaError, match="not on this machine") as err:
        build_text_encoder("open_clip:ViT-B-32/openai")
    assert time.perf_counter() - t0 < 10
    assert "open_clip:ViT-B-32//" in str(err.value)  # says how to pass a local checkpoint


def test_hub_tag_fails_fast_when_offline_flag_is_unset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # Tina's default is offline
    assert text.hub_offline()
    t0 = time.perf_counter()
    with pytest.raises(TinaError):
        build_text_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize(
    "name,message",
    [
        ("bert", "valid forms"),
        ("open_clip:ViT-B-32", "needs both"),
        ("open_clip:NoSuchArch/random", "unknown open_clip architecture"),
        ("open_clip:ViT-B-32/no_such_tag", "not a pretrained tag"),
        ("open_clip:ViT-B-32/ckpt.bin", "open_clip:ViT-B-32/./ckpt.bin"),  # a bare file name reads as a tag
        ("open_clip:ViT-B-32//no/such/file.bin", "does not exist"),
    ],
)
def test_bad_encoder_names(name, message):
    with pytest.raises(TinaError, match=re.escape(message)):
        get_text_encoder(name)


def test_corrupt_checkpoint_is_a_tina_error(tmp_path):
    path = tmp_path / "broken.bin"
    path.write_bytes(b"not a checkpoint")
    encoder = build_text_encoder(f"open_clip:ViT-B-32/{path}")  # found: the load happens on first use
    with pytest.raises(TinaError, match="could not load"):
        encoder.encode(["a cat"])
