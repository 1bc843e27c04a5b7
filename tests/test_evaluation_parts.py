"""The evaluation's statistics, memorization measures and hypernetwork baseline on small synthetic inputs."""

import numpy as np
import pytest
import torch

from evaluation.novelty import NearestZoo, SameSetRuns, classify, normalized_distance
from evaluation.statistics import paired_bootstrap
from tina.layout import layout_for
from tina.targets import get_target
from tina.testing import FASHION_IMAGE


@pytest.fixture(scope="module")
def layout():
    return layout_for("cnn-5k", FASHION_IMAGE, 128)


def _flat(layout, k, seed):
    torch.manual_seed(seed)
    return layout.flatten(get_target("cnn-5k").build(k, FASHION_IMAGE).state_dict())


def test_paired_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true, trials, covered = 0.02, 300, 0
    for i in range(trials):
        task = rng.uniform(0.6, 0.95, 60)  # shared task difficulty: cancels in a paired difference
        a = task + true + rng.normal(0, 0.03, 60)
        b = task + rng.normal(0, 0.03, 60)
        ci = paired_bootstrap(a, b, resamples=1000, seed=i)
        covered += ci["lo"] <= true <= ci["hi"]
    assert 0.90 <= covered / trials <= 0.99


def test_paired_bootstrap_sees_a_small_paired_gain_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(1)
    task = rng.uniform(0.5, 1.0, 100)  # task spread 0.14 >> the gain
    ci = paired_bootstrap(task + 0.01 + rng.normal(0, 0.002, 100), task, resamples=1000)
    assert ci["excludes_zero"] and ci["lo"] > 0 and ci["diff"] == pytest.approx(0.01, abs=0.002)
    same = paired_bootstrap(task, task + rng.normal(0, 0.01, 100), resamples=1000)
    assert same["lo"] < 0 < same["hi"] and not same["excludes_zero"]


def test_nearest_zoo_model_aligns_head_rows_to_the_task_and_skips_the_excluded_key(layout):
    zoo = [{"key": "a", "class_ids": [5, 2, 7], "params": _flat(layout, 3, 1)},
           {"key": "b", "class_ids": [2, 5], "params": _flat(layout, 2, 2)},
           {"key": "c", "class_ids": [1, 3], "params": _flat(layout, 2, 3)}]
    rows = zoo[0]["params"][layout.body_size :].reshape(3, -1)
    copy_of_a = torch.cat([zoo[0]["params"][: layout.body_size], rows[[1, 0]].reshape(-1)])  # task (2, 5) from model a
    near = NearestZoo(layout, [([2, 5], copy_of_a[None], None), ([2, 5], copy_of_a[None], "a")])
    near.add(zoo[:2])
    near.add(zoo[2:])  # streamed in two chunks; c lacks the task's classes
    assert near.best[0]["key"] == ["a"] and float(near.best[0]["distance"][0]) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(near.best[0]["flat"][0], copy_of_a)  # rows put in the task's order
    assert near.best[1]["key"] == ["b"] and float(near.best[1]["distance"][0]) > 0  # "a" excluded (the oracle's own run)
    assert float(near.best[1]["distance"][0]) == pytest.approx(float(normalized_distance(layout, copy_of_a, zoo[1]["params"], 2)))


def test_same_set_runs_pair_two_runs_of_one_class_set_in_any_order(layout):
    runs = SameSetRuns(layout, pairs=5)
    p1, p2 = _flat(layout, 2, 1), _flat(layout, 2, 2)
    swapped = torch.cat([p2[: layout.body_size], p2[layout.body_size :].reshape(2, -1)[[1, 0]].reshape(-1)])
    runs.add([{"key": "x", "class_ids": [3, 4], "params": p1}, {"key": "y", "class_ids": [1, 2], "params": p1},
              {"key": "z", "class_ids": [4, 3], "params": swapped}])
    assert len(runs.pairs) == 1 and runs.pairs[0]["keys"] == ["x", "z"] and runs.pairs[0]["class_ids"] == [3, 4]
    assert runs.pairs[0]["distance"] == pytest.approx(float(normalized_distance(layout, p1, p2, 2)))


def test_copy_average_new():
    assert classify(0.1, 0.9, 1.0, 0.5) == "copy"
    assert classify(0.8, 0.2, 1.0, 0.5) == "average"
    assert classify(0.8, 0.9, 1.0, 0.5) == "new"
    assert classify(None, 0.9, 1.0, 0.5) == "new"  # no training model holds the task's classes
    assert classify(0.1, 0.1, None, 0.5) == "unknown"


def test_hypernet_is_permutation_equivariant_and_ignores_padding(layout):
    from evaluation.hypernet import HyperNet

    torch.manual_seed(0)
    net = HyperNet(layout, cond_dim=8, width=16).eval()
    cond = torch.randn(1, 3, 8)
    Tb, m = layout.n_body_tokens, layout.tokens_per_class
    out = net(cond)  # (1, Tb + 3m, C)
    perm = [2, 0, 1]
    out_p = net(cond[:, perm])
    assert torch.allclose(out[:, :Tb], out_p[:, :Tb], atol=1e-5)  # the body does not depend on class order
    heads, heads_p = out[0, Tb:].reshape(3, m, -1), out_p[0, Tb:].reshape(3, m, -1)
    assert torch.allclose(heads[perm], heads_p, atol=1e-5)  # class rows follow their classes
    padded = net(torch.cat([cond, torch.randn(1, 2, 8)], 1), torch.tensor([[True, True, True, False, False]]))
    assert torch.allclose(padded[:, : Tb + 3 * m], out, atol=1e-5)
