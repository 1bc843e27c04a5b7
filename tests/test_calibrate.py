"""The calibration command (evaluation/calibrate.py): measure, fit, check, write a quality.json Tina then uses."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from evaluation.calibrate import check, fit_predictor, form_texts, main, related_term
from tina.expected import BIN_FEATURE, FEATURES

TINY_ZOO = str(Path(__file__).parent.parent / "configs" / "zoo" / "tiny.yaml")


def _row(acc, k, sim, split="val", form="names"):
    exact = float(sim == 1.0)
    feats = dict.fromkeys(FEATURES, 0.0) | {"exact_frac": exact, "log_k": math.log(k - 1), "logit_structured": 2.0 if exact else -2.0,
                                            BIN_FEATURE: 0.0 if exact else 0.2}
    return {"accuracy": acc, "k": k, "features": feats, "form": form, "split": split}


def test_predictor_learns_that_low_similarity_means_chance():
    rng = random.Random(0)
    rows = [_row(min(1.0, 0.95 + rng.uniform(-0.03, 0.03)), 3, 1.0) for _ in range(30)]
    rows += [_row(1 / 3 + rng.uniform(-0.05, 0.05), 3, 0.3 + rng.uniform(0, 0.1), form="unrelated") for _ in range(30)]
    p = fit_predictor(rows)
    held = [_row(0.95, 3, 1.0), _row(0.34, 3, 0.35, form="unrelated")]
    stats = check(p, held)
    assert stats["mae"] < 0.08
    assert held[0]["expected"] > 0.85 and held[1]["expected"] < 0.5


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
