"""The shipped clip-art generator: what it knows, what it must not know, and that the demo's examples fit it."""

import pytest

HELD_OUT = {"bird", "insect", "person", "playing card", "sports equipment", "stationery"}


@pytest.fixture(scope="module")
def clipart():
    from tina.sample import Tina

    return Tina.from_pretrained("clipart")


def test_clipart_checkpoint_knows_32_rgb_classes_and_none_of_the_held_out_ones(clipart):
    from pathlib import Path

    b = clipart.bundle
    assert b.dataset == "clipart" and (b.image.channels, b.image.size) == (3, 32)
    assert len(b.vocab) == 32 and b.k_max == 32
    assert not HELD_OUT & set(b.vocab)
    assert b.anchor is not None and b.anchor.num_classes == 32
    size = sum(f.stat().st_size for f in Path(b.path).iterdir())
    assert size <= 25 * 1024 * 1024


def test_clipart_generates_a_32_class_model_in_prompt_order(clipart):
    import torch

    classes = list(clipart.bundle.vocab)[::-1]
    net = clipart.generate(classes=classes)
    assert net.classes == classes
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, 32)


def test_demo_examples_for_clipart_name_only_known_classes(clipart):
    from serve.app import examples_for
    from tina.prompts import normalize_class, parse_prompt

    vocab = {normalize_class(v) for v in clipart.bundle.vocab}
    examples = examples_for("clipart", clipart.bundle.vocab)
    assert len(examples) >= 3
    for prompt in examples:
        assert {normalize_class(c) for c in parse_prompt(prompt)} <= vocab, prompt


def test_clipart_reads_a_users_file_the_way_its_training_images_were_rendered(clipart):
    """predict's reader follows the checkpoint's image spec: the clip-art renderer trims blank margins
    (crop) on white, so the checkpoint must say so. Its bundle.json once said crop false: on 12 random
    5-class tasks, 30 openclipart files per class, predict then scored 0.644 against 0.795 with the crop."""
    from tina.training.datasets.render import render_frame

    frame = render_frame(clipart.bundle.image.size)
    got = clipart.bundle.image
    assert (got.crop, got.background, got.channels) == (True, frame.background, frame.channels)
