"""Residual generation: the DiT samples the difference from classifier selection (tina/anchor.py)."""

import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tina import Tina
from tina.anchor import SelectionAnchor
from tina.bundle import load_bundle, save_bundle
from tina.training.data import AugmentConfig, fit_layout_stats, layout_from_manifest, load_anchor, load_split, make_example, read_manifest
from tina.errors import TinaError
from tina.layout import layout_for
from tina.training.testing import FASHION_IMAGE


def _anchor(V=10, seed=0):
    layout = layout_for("cnn-5k", FASHION_IMAGE, 128)
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(layout.body_size, generator=g)
    rows = torch.randn(V, layout.head_dim, generator=g)
    keys = torch.randn(V, 3, 16, generator=g)  # three prompt variants per class
    return layout, SelectionAnchor(body, rows, keys)


def test_origin_is_classifier_selection(tiny_zoo):
    """origin(ids) = the generic body + the generic head rows of the ids, in task order."""
    man = read_manifest(tiny_zoo)
    layout = layout_from_manifest(man)
    anchor = load_anchor(tiny_zoo, layout)
    generic = load_file(tiny_zoo / "generic.safetensors")
    ids = [3, 0, 7]
    net = layout.unflatten(anchor.origin(ids), 3)
    assert torch.equal(net["head.weight"], generic["head.weight"][ids])
    assert torch.equal(net["head.bias"], generic["head.bias"][ids])
    assert torch.equal(net["body.conv2.weight"], generic["body.conv2.weight"])
    with pytest.raises(TinaError, match="outside|not in this anchor"):
        anchor.origin([0, 10])


def test_residual_example_decodes_to_the_stored_model(tiny_zoo):
    """x0 of a permuted example + the origin of its permuted classes gives back the stored model, permuted."""
    man = read_manifest(tiny_zoo)
    layout = layout_from_manifest(man)
    anchor = load_anchor(tiny_zoo, layout)
    fit_layout_stats(tiny_zoo, layout, anchor=anchor)
    m = load_split(tiny_zoo, "train", limit=1)[0]
    k = len(m["classes"])
    rng = random.Random(0)
    ex = make_example(m["params"], m["emb"], layout, AugmentConfig(permute_classes=True), rng, anchor, m["class_ids"])
    perm = list(range(k))
    random.Random(0).shuffle(perm)  # the order make_example drew
    assert perm != sorted(perm) or k == 2
    resid = layout.denormalize(layout.detokenize(ex["x0"], k), k)
    ids = [m["class_ids"][i] for i in perm]
    rebuilt = resid + anchor.origin(ids)
    rows = m["params"][layout.body_size :].reshape(k, -1)[perm]
    assert torch.allclose(rebuilt, torch.cat([m["params"][: layout.body_size], rows.reshape(-1)]), atol=1e-5)
    # residual statistics: the normalised residual has unit scale, unlike the raw weights' statistics
    assert 0.2 < ex["x0"][ex["elem_mask"]].std() < 5


def test_soft_selection_picks_named_classes_and_blends_the_rest():
    layout, anchor = _anchor()
    w = anchor.weights(anchor.keys[[4, 1], 2])  # any variant of a class selects that class
    assert torch.allclose(anchor.soft_origin(w), anchor.origin([4, 1]), atol=1e-4)
    half = torch.nn.functional.normalize(anchor.keys[2, 0] + anchor.keys[5, 1], dim=-1)[None]  # as close to 2 as to 5
    row = anchor.soft_origin(anchor.weights(half))[layout.body_size :]
    expect = anchor.rows[[2, 5]].mean(0)
    assert torch.allclose(row, expect, atol=0.05 * expect.abs().max())


def test_bundle_keeps_the_anchor_and_generation_adds_it(random_generator, tmp_path):
    """Generated = origin(classes, in prompt order) + what the same generator samples without an anchor."""
    layout, anchor = _anchor()
    b = load_bundle(random_generator)
    anchor.keys = b.vocab_emb[:, None].clone()  # match by the vocabulary's names
    b.anchor = anchor
    path = save_bundle(b, tmp_path / "anchored")
    again = load_bundle(path)
    assert torch.equal(again.anchor.rows, anchor.rows) and again.anchor.temperature == anchor.temperature
    plain, anchored = Tina.from_pretrained(random_generator), Tina.from_pretrained(path)
    classes = ["coat", "bag", "dress"]
    ids = [plain.bundle.vocab.index(c) for c in classes]
    a = layout.flatten(anchored.generate(classes=classes, seed=4).state_dict())
    p = layout.flatten(plain.generate(classes=classes, seed=4).state_dict())
    assert torch.allclose(a - p, anchor.origin(ids), atol=1e-4)


def test_bundle_with_a_broken_anchor_is_refused(random_generator, tmp_path):
    layout, anchor = _anchor(V=10)
    b = load_bundle(random_generator)
    b.anchor = anchor
    path = save_bundle(b, tmp_path / "anchored")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    t = load_file(bad / "weights.safetensors")
    t["anchor.rows"] = t["anchor.rows"][:7].contiguous()  # rows for 7 of the 10 vocabulary classes
    t["anchor.keys"] = t["anchor.keys"][:7].contiguous()
    save_file(t, bad / "weights.safetensors")
    with pytest.raises(TinaError, match="anchor has 7 class rows"):
        load_bundle(bad)
    t["anchor.keys"] = t["anchor.keys"][:, :, :5].contiguous()[:6]  # keys that do not match the rows
    save_file(t, bad / "weights.safetensors")
    with pytest.raises(TinaError, match="anchor keys have shape"):
        load_bundle(bad)


def test_hard_selection_has_one_definition():
    """tina.anchor.select_classes (a state dict: the zoo's start, the evaluation baseline) and
    SelectionAnchor.origin (its flat form, the generator's origin) are the same selection."""
    from tina.anchor import select_classes
    from tina.targets import get_target

    layout = layout_for("cnn-5k", FASHION_IMAGE, 128)
    generic = get_target("cnn-5k").build(10, FASHION_IMAGE).state_dict()
    anchor = SelectionAnchor.from_generic(layout, generic, torch.randn(10, 2, 16))
    ids = [3, 0, 7]
    assert torch.equal(layout.flatten(select_classes(generic, ids)), anchor.origin(ids))
    held_out = select_classes(generic, [10, 2], proxy={10: 4})  # class 10 borrows class 4's row
    assert torch.equal(held_out["head.bias"], generic["head.bias"][[4, 2]])
