"""Checkpoint registry and routing, expected accuracy, warnings and refusals (tina/routing.py, tina/expected.py)."""

import json

import pytest

import tina.registry as registry
from tina import Tina
from tina.cli import main
from tina.errors import TinaError
from tina.registry import resolve_checkpoint
from tina.routing import route
from tina.targets import ImageSpec

SHIPPED_FM = registry.CHECKPOINT_DIR / "fashion-mnist"
CLIPART_LIKE = ["bird", "cat", "dog", "flower", "tree", "fruit", "building", "mammal", "flag", "tool"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A registry folder with a Fashion-MNIST-like and a clip-art-like untrained bundle."""
    from tina.training.testing import random_bundle

    root = tmp_path_factory.mktemp("registry")
    random_bundle(root / "fashion-mnist")
    random_bundle(root / "clipart", classes=CLIPART_LIKE, image=ImageSpec(3, 32, (0.77, 0.74, 0.71), (0.33, 0.33, 0.36)),
                  dataset="clipart", seed=1)
    return root


@pytest.fixture()
def registry_of(monkeypatch):
    def use(root):
        monkeypatch.setattr(registry, "CHECKPOINT_DIR", root)
        return root
    return use


@pytest.fixture()
def fm_only(tmp_path, registry_of):
    """The shipped Fashion-MNIST checkpoint (with its calibration) as the only shipped one."""
    root = tmp_path / "ckpts"
    root.mkdir()
    (root / "fashion-mnist").symlink_to(SHIPPED_FM.resolve())
    return registry_of(root)


@pytest.fixture(scope="module")
def fm():
    return Tina.from_pretrained("default")


def test_default_is_an_alias_of_the_shipped_fashion_mnist_checkpoint():
    assert "fashion-mnist" in registry.shipped()
    assert resolve_checkpoint("default") == resolve_checkpoint("fashion-mnist") == SHIPPED_FM
    with pytest.raises(TinaError, match="fashion-mnist"):
        resolve_checkpoint("no-such-checkpoint")


def test_route_picks_the_checkpoint_whose_vocabulary_covers_the_classes(two_checkpoints, registry_of):
    registry_of(two_checkpoints)
    r = route(["cat", "bird"])
    assert r.checkpoint == "clipart" and "knows 2/2" in r.reason and "fashion-mnist 0/2" in r.reason
    assert route(["sneaker", "sandal"]).checkpoint == "fashion-mnist"
    assert route(["sneaker", "sandal"], checkpoint="clipart").checkpoint == "clipart"  # --checkpoint overrides
    t = Tina.from_pretrained("auto", prompt="classify cats vs birds")
    assert t.bundle.vocab == CLIPART_LIKE and t.bundle.image.channels == 3
    with pytest.raises(TinaError, match="prompt"):
        Tina.from_pretrained("auto")


def test_generate_without_checkpoint_routes_and_records_the_decision(two_checkpoints, registry_of, tmp_path, capsys):
    registry_of(two_checkpoints)
    out = tmp_path / "m"
    assert main(["generate", "classify cats vs birds", "-o", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint: routed clipart: knows 2/2 classes" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["routing"]["checkpoint"] == "clipart" and set(cfg["routing"]["candidates"]) == {"clipart", "fashion-mnist"}
    assert cfg["image"]["channels"] == 3
    assert cfg["expected_accuracy"]["value"] is None and "no calibration" in cfg["expected_accuracy"]["basis"]


def test_info_lists_every_shipped_checkpoint(two_checkpoints, registry_of, capsys):
    registry_of(two_checkpoints)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "clipart: 32x32 RGB images of clipart" in text and "fashion-mnist (alias: default): 28x28 grey" in text
    assert "mammal" in text and "not calibrated" in text


# ---- the shipped checkpoint: expected accuracy, warnings, refusals --------------------------------------


def test_shipped_checkpoint_is_calibrated(fm):
    q = fm.bundle.quality
    assert q is not None and q["vocab"] == fm.bundle.vocab
    # all-forms check MAE: 0.098 for the session-8 weights, 0.101 for the session-10 (task-loss) weights;
    # the bound allows that difference, not a worse calibration
    assert q["check"]["split"] == "unseen_combo" and q["check"]["mae"] < 0.11 and 0.6 <= q["check"]["coverage"] <= 0.97
    assert 0.3 < q["thresholds"]["unknown_similarity"] < 0.7


def test_expected_accuracy_is_high_for_known_classes_and_near_chance_for_a_collision(fm):
    good = fm.make_task("classify sneakers vs sandals").assessment
    assert good.expected > 0.9 and good.low <= good.expected <= good.high <= 1 and not good.warnings
    bad = fm.make_task("classify handbags vs backpacks")
    assert bad.assessment.expected < 0.75
    assert any("'handbag'" in w and "'backpack'" in w and "'bag'" in w for w in bad.warnings)  # collision
    assert any("near chance" in w for w in bad.warnings)


@pytest.mark.parametrize("prompt,needle", [
    ("boots, sneakers and sandals", "'boot' is broader than the known class 'ankle boot'"),
    ("a coat or a jacket", "'jacket'"),
])
def test_broader_narrower_and_collision_warnings_name_the_known_class(fm, prompt, needle):
    warnings = fm.make_task(prompt).warnings
    assert any(needle in w for w in warnings), warnings
    if "jacket" in prompt:
        assert any("coat" in w and ("both resolve" in w or "narrower" in w) for w in warnings)


@pytest.mark.parametrize("prompt", ["classify cats vs birds", "dogs vs cats", "hot dog or not hot dog"])
def test_unknown_classes_are_refused_with_exit_2(fm_only, prompt, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["generate", prompt, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint knows") and err.count("\n") == 1
    assert "fashion-mnist:" in err and "--allow-unknown" in err and not out.exists()


def test_allow_unknown_generates_and_marks_the_model(fm_only, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["generate", "hot dog or not hot dog", "--allow-unknown", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "expected accuracy" in captured.out and "far from this checkpoint's vocabulary" in captured.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["allowed_unknown"] is True and cfg["unknown_classes"] == ["hot dog", "not hot dog"]
    e = cfg["expected_accuracy"]
    assert e["low"] <= e["value"] <= e["high"] and e["value"] < 0.75 and "MAE" in e["basis"]


def test_generate_prints_and_records_expected_accuracy(fm_only, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["generate", "classify handbags vs backpacks", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "checkpoint: routed fashion-mnist" in captured.out and "known classes used: handbag -> bag" in captured.out
    assert "expected accuracy 0." in captured.out and "both resolve to the known class 'bag'" in captured.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["routing"]["checkpoint"] == "fashion-mnist" and cfg["allowed_unknown"] is False
    assert [m["known"] for m in cfg["known_classes"]] == ["bag", "bag"]


def test_quality_file_must_match_the_vocabulary(random_generator, tmp_path):
    import shutil

    from tina.bundle import load_bundle

    bad = tmp_path / "g"
    shutil.copytree(random_generator, bad)
    q = json.loads((SHIPPED_FM / "quality.json").read_text())
    q["vocab"] = q["vocab"][::-1]
    (bad / "quality.json").write_text(json.dumps(q))
    with pytest.raises(TinaError, match="calibrated for another vocabulary"):
        load_bundle(bad)
