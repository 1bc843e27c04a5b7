"""benchmarks/target_scaling.py: the table, verdicts and JSON assembled from (fake) stage records, and the
stage cache. The real runs take an hour on a CPU; what can go wrong in the assembly is checked here in milliseconds."""

from __future__ import annotations

import json

import pytest

from benchmarks import target_scaling as ts


def _diff(d: float, lo: float, hi: float) -> dict:
    return {"diff": d, "lo": lo, "hi": hi, "n": 48, "se": 0.0, "excludes_zero": lo > 0 or hi < 0}


def _records(target: str, params: int, tokens: int, gen: float, retr: float, retr_ci: tuple[float, float]) -> dict:
    """Stage records shaped as the stages write them, with one eval split summary."""
    split = {"tasks": 48,
             "generated": {"names": {"mean": gen}},
             "baselines": {"oracle": {"mean": 0.90}, "selection": {"mean": 0.85}, "retrieval": {"mean": retr}},
             "headline": {"generated": gen, "oracle": 0.90, "selection": 0.85, "ratio_to_oracle": gen / 0.90,
                          "gain_captured": (gen - 0.85) / 0.05,
                          "differences": {"generated - retrieval": _diff(gen - retr, *retr_ci),
                                          "generated - selection": _diff(gen - 0.85, 0.01, 0.03),
                                          "oracle - generated": _diff(0.90 - gen, 0.01, 0.04)}}}
    return {"zoo": {"key": {}, "models": 364, "wall_s": 100.0, "cpu_s": 180.0 if params < 10_000 else 1800.0,
                    "generic": {"test_acc": 0.8}},
            "train": {"key": {"steps": 600, "batch_size": 32, "size": "DiT-T"}, "generator_parameters": 1_000_000,
                      "wall_s": 60.0, "cpu_s": 100.0 if params < 10_000 else 500.0, "fit_s": 55.0},
            "ev": {"split": split, "wall_s": 20.0},
            "latency": {"median_s": 0.01, "batched_models_per_s": 100.0},
            "counts": {"params_k10": params, "tokens_k10": tokens, "token_size": 160}}


def test_assembled_results_name_the_baseline_that_beats_the_generator():
    cfg = ts.TargetScalingConfig()
    records = {"cnn-5k": _records("cnn-5k", 5018, 34, gen=0.88, retr=0.86, retr_ci=(0.01, 0.03)),
               "cnn-33k": _records("cnn-33k", 29066, 186, gen=0.86, retr=0.875, retr_ci=(-0.025, -0.005))}
    res = ts.assemble(cfg, records, "python -m benchmarks.target_scaling", "test machine")
    json.dumps(res)  # the committed JSON must serialise
    small, big = res["rows"]
    assert small["target"] == "cnn-5k" and big["params_k10"] == 29066
    assert small["latency"]["params_per_s"] == 501_800  # 5,018 parameters in 0.01 s
    assert "generated beats retrieval" in ts.verdict(small)[0]
    assert ts.verdict(big)[0].startswith("retrieval beats generated")
    beaten = [s for s in res["summary"] if "a baseline beats the generator" in s]
    assert len(beaten) == 1 and beaten[0].startswith("On cnn-33k")
    assert "5.8x the parameters" in res["summary"][0] and "10.0x the CPU seconds" in res["summary"][0]
    md = ts.markdown(res)
    assert "| cnn-33k | 29,066 | 186 |" in md and "python -m benchmarks.target_scaling" in md


def test_an_interval_across_zero_is_a_tie():
    rec = _records("cnn-5k", 5018, 34, gen=0.88, retr=0.879, retr_ci=(-0.004, 0.006))
    row = ts.row("cnn-5k", **rec)
    assert ts.verdict(row)[0].startswith("generated vs retrieval: a tie")
    assert not [s for s in ts.summary([row]) if "beats the generator" in s]


def test_a_missing_baseline_or_latency_leaves_a_dash():
    rec = _records("cnn-5k", 5018, 34, gen=0.88, retr=0.86, retr_ci=(0.01, 0.03))
    del rec["ev"]["split"]["baselines"]["retrieval"]
    rec["latency"] = None
    res = ts.assemble(ts.TargetScalingConfig(targets=["cnn-5k"]), {"cnn-5k": rec}, "cmd", "m")
    line = next(x for x in ts.markdown(res).splitlines() if x.startswith("| cnn-5k"))
    assert line.count("| – |") == 2  # latency and retrieval


def test_a_stage_record_is_reused_only_with_the_same_settings(tmp_path):
    path = tmp_path / "zoo.json"
    ts._store(path, {"identity_hash": "a"}, {"wall_s": 1.0})
    assert ts._cached(path, {"identity_hash": "a"})["wall_s"] == 1.0
    assert ts._cached(path, {"identity_hash": "b"}) is None


def test_config_rejects_an_empty_budget():
    with pytest.raises(ValueError):
        ts.TargetScalingConfig(steps=0)
    with pytest.raises(ValueError):
        ts.TargetScalingConfig(targets=[])
    assert ts.TargetScalingConfig.preset(quick=True).steps < ts.TargetScalingConfig.preset(quick=False).steps


def test_help_lists_quick(capsys):
    with pytest.raises(SystemExit) as e:
        ts.main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
