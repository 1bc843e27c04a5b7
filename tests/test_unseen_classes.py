"""Strict unseen classes: held-out classes stay out of the generic model, the anchor, the
generator's vocabulary and every train task; unseen_class tasks start from the nearest known class."""

import json

import numpy as np
import pytest
import torch


def _manifest(zoo):
    return json.loads((zoo / "manifest.json").read_text())


def test_generic_model_never_trains_on_held_out_classes(tiny_zoo):
    from safetensors.torch import load_file

    from tina.training.datasets import load_dataset
    from tina.targets import ImageSpec, get_target

    man = _manifest(tiny_zoo)
    held = man["held_out_classes"]
    assert len(held) == 2
    ds = load_dataset("fashion-mnist")
    net = get_target("cnn-5k").build(10, ImageSpec.from_dict(man["dataset"]["image"]))
    net.load_state_dict(load_file(str(tiny_zoo / "generic.safetensors")), strict=True)
    x, _ = ds.tensors("test", slice(0, 2000))
    with torch.no_grad():
        pred = net.eval()(x).argmax(1)
    # Cross-entropy on the known classes pushes the never-target rows down: a generic model that had
    # seen the held-out classes would predict them for ~20% of the images.
    assert np.isin(pred.numpy(), held).mean() < 0.01
    assert json.loads((tiny_zoo / "generic.json").read_text())["held_out_classes"] == held


def test_no_train_val_or_combo_task_contains_a_held_out_class(tiny_zoo):
    man = _manifest(tiny_zoo)
    held = set(man["held_out_classes"])
    for split in ("train", "val", "unseen_combo"):
        for tid in man["splits"].get(split, []):
            assert not held & set(man["tasks"][tid])
    assert all(held & set(man["tasks"][tid]) for tid in man["splits"]["unseen_class"])


def test_held_out_classes_start_from_the_nearest_known_class_row():
    from zoo_builder.tasks import nearest_known
    from zoo_builder.fit import selection_state_dicts

    names = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0.1, 0], [0, 0.2, 1.0]]), dim=-1)
    proxy = nearest_known(names, [2, 3])
    assert proxy == {2: 0, 3: 1}
    generic = {"body.w": torch.zeros(2), "head.weight": torch.arange(8.0).reshape(4, 2), "head.bias": torch.arange(4.0)}
    sd = selection_state_dicts(generic, [[2, 1, 3]], proxy)[0]
    assert sd["head.bias"].tolist() == [0.0, 1.0, 1.0]  # rows of classes 0, 1, 1


def test_anchor_and_bundle_vocabulary_leave_held_out_classes_out(tiny_zoo, tiny_run):
    from tina.bundle import load_bundle
    from tina.training.data import layout_from_manifest, load_anchor
    from tina.errors import TinaError

    man = _manifest(tiny_zoo)
    held = man["held_out_classes"]
    known = [c for c in range(10) if c not in held]
    anchor = load_anchor(tiny_zoo, layout_from_manifest(man))
    assert anchor.num_classes == 8 and anchor.ids.tolist() == known
    layout = layout_from_manifest(man)
    # origin() takes dataset class ids: row of dataset class known[3] is anchor row 3
    o = anchor.origin([known[3], known[0]])
    torch.testing.assert_close(o[layout.body_size :].reshape(2, -1), anchor.rows[[3, 0]])
    with pytest.raises(TinaError):
        anchor.origin([held[0]])
    bundle = load_bundle(tiny_run / "bundle")
    names = man["dataset"]["classes"]
    assert bundle.vocab == [names[c] for c in known]
    assert bundle.anchor.ids.tolist() == known  # survives the safetensors round trip


def test_unseen_class_evaluation_reports_every_baseline(tiny_zoo, tiny_run):
    from evaluation.unseen_classes import evaluate_unseen, markdown

    r = evaluate_unseen(tiny_zoo, str(tiny_run / "bundle"), tasks=3, shots=())
    assert r["tasks"] == 3 and set(r["held_out_classes"]) and r["summary"]["chance"]["all"] > 0
    for meth in ("oracle", "nearest_known_selection", "generated_names", "generated_description"):
        s = r["summary"][meth]
        assert 0 <= s["held_out"] <= 1 and 0 <= s["all"] <= 1
    assert "halfway_held_out" in r["summary"]["generated_names"]
    assert "| oracle |" in markdown(r)
