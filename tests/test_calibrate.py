"""The calibration command (evaluation/calibrate.py): measure, fit, check, write a quality.json Tina then uses."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from evaluation.calibrate import fit_all, form_texts, main, read_extra_rows, related_term, CalibrationConfig
from evaluation.calibration_fit import check, fit_near_chance, fit_predictor
from tina.errors import TinaError
from tina.expected import BIN_FEATURE, FEATURES

TINY_ZOO = str(Path(__file__).parent.parent / "configs" / "zoo" / "tiny.yaml")


def _row(acc, k, sim, split="val", form="names", task=None):
    exact = float(sim == 1.0)
    feats = dict.fromkeys(FEATURES, 0.0) | {"exact_frac": exact, "log_k": math.log(k - 1), "logit_structured": 2.0 if exact else -2.0,
                                            BIN_FEATURE: 0.0 if exact else 0.9}
    _row.n = getattr(_row, "n", 0) + 1
    return {"accuracy": acc, "k": k, "features": feats, "form": form, "split": split, "task": _row.n if task is None else task}


def test_predictor_learns_that_low_similarity_means_chance():
    rng = random.Random(0)
    rows = [_row(min(1.0, 0.95 + rng.uniform(-0.03, 0.03)), 3, 1.0) for _ in range(30)]
    rows += [_row(1 / 3 + rng.uniform(-0.05, 0.05), 3, 0.3 + rng.uniform(0, 0.1), form="unrelated") for _ in range(30)]
    p = fit_predictor(rows)
    held = [_row(0.95, 3, 1.0), _row(0.34, 3, 0.35, form="unrelated")]
    stats = check(p, held)
    assert stats["mae"] < 0.08
    assert held[0]["expected"] > 0.85 and held[1]["expected"] < 0.5


def test_range_reaches_below_chance_for_unrelated_words_and_stays_narrow_for_exact_names():
    rng = random.Random(1)
    fit = [_row(min(1.0, 0.93 + rng.gauss(0, 0.02)), 4, 1.0) for _ in range(80)]
    fit += [_row(0.25 + rng.gauss(0, 0.04), 4, 0.3, form="unrelated") for _ in range(80)]  # about half under chance
    p = fit_predictor(fit)
    held = [_row(min(1.0, 0.93 + rng.gauss(0, 0.02)), 4, 1.0) for _ in range(100)]
    held += [_row(0.25 + rng.gauss(0, 0.04), 4, 0.3, form="unrelated") for _ in range(100)]
    stats = check(p, held)
    for form in ("names", "unrelated"):
        assert 0.65 <= stats["by_form"][form]["coverage"] <= 0.97, (form, stats["by_form"][form])
    assert held[-1]["low"] < 0.25  # under chance: a logit-space range never got there (31-38% coverage)
    assert stats["by_form"]["names"]["mean_width"] < stats["by_form"]["unrelated"]["mean_width"]
    assert float(p["cv_coverage"][f"{p['coverage']:.2f}"]) >= 0.8  # the percentiles were chosen on the fit rows


def test_near_chance_cut_separates_models_measured_near_chance():
    rng = random.Random(2)
    rows = [_row(min(1.0, 0.9 + rng.gauss(0, 0.03)), 3, 1.0) for _ in range(40)]
    rows += [_row(1 / 3 + rng.gauss(0, 0.04), 3, 0.3, form="unrelated") for _ in range(40)]
    p = fit_predictor(rows)
    near = fit_near_chance(p, rows)
    assert near["balanced_accuracy"] > 0.95 and 0 < near["value"] < 1
    stats = check(p, rows, near["value"])
    assert stats["near_chance_warning"]["recall"] > 0.9 and stats["near_chance_warning"]["precision"] > 0.9


def _rows_file(text_encoder="minilm", splits=("val", "unseen_class")):
    """A small quality_rows.json: 2-class tasks over a 3-class vocabulary; unseen_class tasks name a class the
    vocabulary lacks ('sandal', nearest 'sneaker') and score near chance."""
    rng = random.Random(3)

    def match(name, known, idx, sim, true):
        return {"name": name, "known": known, "index": idx, "similarity": sim, "runner_up": "bag", "margin": 0.1,
                "from_images": False, "resolved_true": true}

    rows = []
    for t in range(40):
        split = splits[t % len(splits)]
        if split == "unseen_class":
            ms = [match("sandal", "sneaker", 1, 0.55 + rng.uniform(-0.05, 0.05), False), match("coat", "coat", 0, 1.0, True)]
            acc = 0.5 + rng.uniform(-0.08, 0.08)
        else:
            ms = [match("coat", "coat", 0, 1.0, True), match("sneaker", "sneaker", 1, 1.0, True)]
            acc = 0.95 + rng.uniform(-0.03, 0.03)
        rows.append({"split": split, "task": t, "form": "names", "k": 2, "accuracy": acc, "matches": ms})
        rows.append({"split": split, "task": t, "form": "unrelated", "k": 2, "accuracy": 0.5 + rng.uniform(-0.05, 0.05),
                     "matches": [match("banjo", "bag", 2, 0.2, False), match("kettle", "coat", 0, 0.25, False)]})
        rows.append({"split": split, "task": t, "form": "related", "k": 2, "accuracy": 0.9 + rng.uniform(-0.05, 0.05),
                     "matches": [match("jacket", "coat", 0, 0.8 + rng.uniform(-0.05, 0.05), True), ms[1]]})
    return {"format": "tina-quality/1-rows", "vocab": ["coat", "sneaker", "bag"], "layout_fingerprint": "x", "dataset": "d",
            "text_encoder": text_encoder, "pair_recall": [[None, 0.95, 0.95], [0.95, None, 0.95], [0.95, 0.95, None]],
            "fit_rows": [r for r in rows if r["split"] != "unseen_combo"], "check_rows": rows[:6], "measure_seconds": 1.0}


def test_held_out_generator_rows_join_the_fit_and_are_checked_on_their_own_half(tmp_path):
    extra_file = tmp_path / "quality_rows.json"
    extra_file.write_text(json.dumps(_rows_file()))
    with pytest.raises(TinaError, match="text encoder"):
        read_extra_rows(extra_file, "clip")
    (tmp_path / "bad.json").write_text(json.dumps(_rows_file(splits=("val",))))
    with pytest.raises(TinaError, match="no unseen_class rows"):
        read_extra_rows(tmp_path / "bad.json", "minilm")
    own = _rows_file(splits=("val",))
    plain = fit_all(json.loads(json.dumps(own)), CalibrationConfig("c", "z.yaml"), "d", "c")
    m = json.loads(json.dumps(own)) | {"extra": [read_extra_rows(extra_file, "minilm")]}
    q = fit_all(m, CalibrationConfig("c", "z.yaml"), "d", "c")
    assert "heldout:unseen_class" in q["fit"]["splits"] and q["fit"]["rows"] == plain["fit"]["rows"] + 30
    assert q["check_unknown"]["rows"] == 30 and "--extra-rows" in q["command"]  # the other half, never fitted on
    # only the held-out rows show that a class at similarity ~0.55 does not resolve: they set the unknown threshold
    assert plain["thresholds"]["unknown_fit"]["value"] is None or plain["thresholds"]["unknown_similarity"] < 0.55
    assert q["thresholds"]["unknown_similarity"] > 0.55


def test_prompt_forms_keep_the_true_classes_known():
    rng = random.Random(0)
    assert form_texts("names", ["coat", "bag"], rng) == ["coat", "bag"]
    assert related_term("ankle boot", rng) == "boot"  # not in WordNet: its head noun
    texts = form_texts("one_unrelated", ["coat", "bag", "shirt"], rng)
    assert len(texts) == 3 and sum(t in ("coat", "bag", "shirt") for t in texts) == 2


def test_calibrate_writes_a_quality_file_the_generator_uses(random_generator, tmp_path, fashion_mnist):
    from tina import Tina

    gen = tmp_path / "gen"
    shutil.copytree(random_generator, gen)
    args = [str(gen), "--zoo-config", TINY_ZOO, "--images-per-class", "10", "--max-tasks", "3", "--forms", "names", "unrelated"]
    assert main(args) == 0
    q = json.loads((gen / "quality.json").read_text())
    assert q["fit"]["splits"] == ["unseen_class"] and q["check"]["split"] == "unseen_combo"  # tiny zoo: no val split
    assert (gen / "quality_rows.json").is_file() and "resolution" in q["predictor"]  # None when the fit has no unknown classes
    assert len(q["pair_recall"]) == 10 and q["pair_recall"][0][0] is None and 0 <= q["pair_recall"][0][1] <= 1
    assert "evaluation.calibrate" in q["command"] and q["check"]["rows"] > 0
    a = Tina.from_pretrained(gen).make_task("coat vs bag").assessment
    assert a.expected is not None and a.low <= a.expected <= a.high
    assert main([*args, "--refit"]) == 0  # refit from the stored measurements, no generation
    assert json.loads((gen / "quality.json").read_text())["check"]["mae"] == pytest.approx(q["check"]["mae"])
