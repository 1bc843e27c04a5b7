"""tina eval: the baselines, statistics and memorization measures (unit tests on small synthetic pieces) and one
end-to-end run on the tiny zoo.

The end-to-end run reuses conftest's session fixtures (the tiny zoo and a generator trained for a few
steps), so the whole suite builds them once.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tina.errors import TinaError
from evaluation.baselines import HeadComposition, TextRetrieval, selection_flat
from evaluation.cli import main
from evaluation.config import BASELINES, FORMS, load_eval_config
from evaluation.novelty import NearestZoo, SameSetRuns, classify, normalized_distance
from evaluation.prompts import mismatched_ids
from evaluation.scoring import flat_accuracies
from evaluation.statistics import paired_bootstrap
from tina.layout import layout_for
from tina.targets import get_target
from tina.training.testing import FASHION_IMAGE

CONFIGS = Path(__file__).parent.parent / "configs" / "eval"


@pytest.fixture(scope="module")
def layout():
    return layout_for("cnn-5k", FASHION_IMAGE, 128)


def _net_flat(layout, k, seed):
    torch.manual_seed(seed)
    return layout.flatten(get_target("cnn-5k").build(k, FASHION_IMAGE).state_dict())


def _models(layout, tasks: list[list[int]], num_classes=10):
    """Zoo models whose class embeddings are one-hot (class c <-> basis vector c), so similarities are exact."""
    eye = torch.eye(num_classes)
    models = [{"key": f"task-{i:06d}", "class_ids": ids, "emb": eye[ids][:, None, :],
               "params": _net_flat(layout, len(ids), seed=i)} for i, ids in enumerate(tasks)]
    return models, eye


def _retrieve(models, query, chunk=2):
    """Stream the models through a TextRetrieval in chunks (as scan_zoo does)."""
    r = TextRetrieval([query])
    for i in range(0, len(models), chunk):
        r.add(models[i : i + chunk])
    return r


# ---- baselines --------------------------------------------------------------------------------------


def test_selection_is_the_generic_rows_of_the_task_classes(layout):
    generic = get_target("cnn-5k").build(10, FASHION_IMAGE).state_dict()
    ids = [7, 2, 5]
    state = layout.unflatten(selection_flat(layout, generic, ids), 3)
    assert torch.equal(state["head.weight"], generic["head.weight"][ids])
    assert torch.equal(state["head.bias"], generic["head.bias"][ids])
    for name, value in state.items():
        if name.startswith("body."):
            assert torch.equal(value, generic[name])


def test_retrieval_finds_the_same_class_set_and_reorders_its_rows(layout):
    models, eye = _models(layout, [[0, 1], [2, 5, 7], [2, 5, 8]])
    r = _retrieve(models, eye[[7, 2, 5]])
    hit, flat = r.hit(0), r.flat(layout, 0)
    assert hit["key"] == "task-000001" and hit["rows"] == [2, 0, 1] and hit["score"] == pytest.approx(1.0)
    src = models[1]["params"]
    rows = src[layout.body_size :].reshape(3, layout.head_dim)
    assert torch.equal(flat[: layout.body_size], src[: layout.body_size])  # its body, unchanged
    assert torch.equal(flat[layout.body_size :].reshape(3, -1), rows[[2, 0, 1]])  # rows follow the task's order


def test_retrieval_serves_a_missing_class_with_its_most_similar_row(layout):
    models, eye = _models(layout, [[0, 1], [3, 4]])
    query = torch.stack([eye[3], 0.9 * eye[4] + 0.1 * eye[9]])  # class "9-ish" is closest to class 4
    hit = _retrieve(models, query).hit(0)
    assert hit["key"] == "task-000001" and hit["rows"] == [0, 1]


def test_retrieval_prefers_the_closest_k_on_ties_and_the_first_model_across_chunks(layout):
    models, eye = _models(layout, [[1, 2, 3, 4], [2, 1], [5, 6], [1, 2]])
    assert _retrieve(models, eye[[1, 2]], chunk=1).hit(0)["key"] == "task-000001"  # k=2 beats k=4; the first k=2 wins
    assert _retrieve(models, eye[[1, 2]], chunk=4).hit(0)["key"] == "task-000001"  # chunking does not change it


def test_head_composition_averages_bodies_and_per_class_rows_on_either_body(layout):
    models, _ = _models(layout, [[0, 1], [1, 2]])
    comp = HeadComposition(layout)
    comp.add(models[:1])
    comp.add(models[1:])  # streamed in two chunks
    flat = comp.flat([1, 0, 9])  # class 9: in no zoo model
    a, b = models[0]["params"], models[1]["params"]
    D1 = layout.head_dim
    rows = flat[layout.body_size :].reshape(3, D1)
    ra, rb = a[layout.body_size :].reshape(2, D1), b[layout.body_size :].reshape(2, D1)
    assert torch.allclose(flat[: layout.body_size], (a[: layout.body_size] + b[: layout.body_size]) / 2)
    assert torch.allclose(rows[0], (ra[1] + rb[0]) / 2)  # class 1: position 1 of A, position 0 of B
    assert torch.allclose(rows[1], ra[0])  # class 0: only in A
    assert torch.allclose(rows[2], torch.cat([ra, rb]).mean(0))  # unknown class: mean of all rows
    generic_body = torch.randn(layout.body_size)
    on_generic = comp.flat([1, 0, 9], generic_body)
    assert torch.equal(on_generic[: layout.body_size], generic_body) and torch.allclose(on_generic[layout.body_size :], flat[layout.body_size :])


def test_mismatched_classes_never_share_a_position():
    import random

    tasks = [[0, 1, 2], [1, 2, 0], [3, 4, 5], [0, 4, 6], [7, 8]]
    rng = random.Random(0)
    for ids in ([0, 1, 2], [3, 4, 5], [7, 8], [9, 3]):
        other = mismatched_ids(ids, tasks, 10, rng)
        assert len(other) == len(ids) and all(a != b for a, b in zip(other, ids))
    assert set(mismatched_ids([0, 1, 2], tasks, 10, rng)) == {3, 4, 5}  # a disjoint task when there is one


def test_finetune_schedule_is_the_zoo_builders():
    from evaluation.finetune import recipe_lr
    from zoo_builder.fit import lr_at

    ft = {"lr": 3e-3, "warmup_steps": 10, "steps": 100}
    assert [recipe_lr(s, 100, ft) for s in range(100)] == pytest.approx([lr_at(s, 100, 3e-3, 10) for s in range(100)])
    assert recipe_lr(0, 10, ft) == pytest.approx(3e-3)  # a 10-step budget: warm-up scaled to 1 step
    assert recipe_lr(5, 10, {"lr": 1e-3}) == 1e-3  # zoos from before the schedule: constant


def test_batched_scoring_matches_one_model_at_a_time(layout):
    from types import SimpleNamespace

    from tina.training.accuracy import accuracy

    k = 3
    nets = [get_target("cnn-5k").build(k, FASHION_IMAGE) for _ in range(4)]
    flats = torch.stack([layout.flatten(n.state_dict()) for n in nets])
    flats[3, 5] = float("nan")
    bundle = SimpleNamespace(target="cnn-5k", image=FASHION_IMAGE, layout=layout, base={})
    x, y = torch.rand(50, 1, 28, 28), torch.randint(0, k, (50,))
    acc = flat_accuracies(bundle, flats, k, x, y, eval_batch=16)
    assert acc[:3].tolist() == pytest.approx([accuracy(n, x, y) for n in nets[:3]])
    assert acc[3].item() == pytest.approx(1 / k)  # non-finite weights score chance


# ---- statistics, memorization, hypernetwork ------------------------------------------------------------


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


def test_gain_captured_is_undefined_when_the_oracle_barely_beats_selection():
    from tina.training.accuracy import MIN_ORACLE_GAIN, gain_captured

    assert gain_captured(0.95, 0.96, 0.90) == pytest.approx(5 / 6)
    assert gain_captured(0.89, 0.96, 0.90) == pytest.approx(-1 / 6)  # worse than selection: negative, still defined
    # oracle - selection within noise: the ratio would be -7 or +12 here; it is reported as undefined instead
    assert gain_captured(0.893, 0.901, 0.900) is None
    assert gain_captured(0.912, 0.901, 0.900) is None
    assert gain_captured(0.9, 0.88, 0.90) is None  # the oracle below selection
    assert gain_captured(0.9, float("nan"), 0.9) is None
    assert gain_captured(0.95, 0.90 + MIN_ORACLE_GAIN, 0.90) == pytest.approx(5.0)


def test_split_gain_captured_is_the_ratio_of_mean_accuracies_and_undefined_within_noise():
    from evaluation.statistics import split_summary

    def task(g, o, s):
        return {"generated": {"names": [g, g]}, "oracle": o, "selection": s, "zoo_oracle": None, "k": 2}

    # one task where oracle ~ selection: its own ratio is (0.95 - 0.90) / 0.0001 = 500, a mean of ratios explodes
    tasks = [task(0.95, 0.9001, 0.90), task(0.80, 0.90, 0.70), task(0.85, 0.90, 0.80)]
    h = split_summary(tasks, ["names"], ["oracle", "selection"], resamples=10)["headline"]
    g, o, s = np.mean([0.95, 0.80, 0.85]), np.mean([0.9001, 0.90, 0.90]), np.mean([0.90, 0.70, 0.80])
    assert h["gain_captured"] == pytest.approx((g - s) / (o - s)) and 0 < h["gain_captured"] < 2
    flat = split_summary([task(0.95, 0.9001, 0.90), task(0.80, 0.8002, 0.80)], ["names"], ["oracle", "selection"], resamples=10)
    assert flat["headline"]["gain_captured"] is None and flat["headline"]["ratio_to_oracle"] > 0


def test_nearest_zoo_model_aligns_head_rows_to_the_task_and_skips_the_excluded_key(layout):
    zoo = [{"key": "a", "class_ids": [5, 2, 7], "params": _net_flat(layout, 3, 1)},
           {"key": "b", "class_ids": [2, 5], "params": _net_flat(layout, 2, 2)},
           {"key": "c", "class_ids": [1, 3], "params": _net_flat(layout, 2, 3)}]
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
    p1, p2 = _net_flat(layout, 2, 1), _net_flat(layout, 2, 2)
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


# ---- configs and errors --------------------------------------------------------------------------------


def test_eval_configs_load_and_bad_keys_are_errors():
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_eval_config(str(path))
    with pytest.raises(TinaError, match="unknown prompt forms"):
        load_eval_config(None, ["forms=[names,nonsense]"])
    with pytest.raises(TinaError):
        load_eval_config(None, ["no_such_key=1"])


def test_paper_setting_fails_clearly_where_its_pieces_are_missing(tmp_path):
    cfg = load_eval_config(str(CONFIGS / "cifar100_paper.yaml"), [f"zoo={tmp_path / 'nozoo'}", f"out={tmp_path / 'out'}",
                                                                   f"checkpoint={tmp_path / 'nobundle'}"])
    from evaluation import evaluate

    with pytest.raises(TinaError, match="cannot run here") as e:
        evaluate(cfg)
    assert "zoo" in str(e.value) and "checkpoint" in str(e.value)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--checkpoint" in capsys.readouterr().out


# ---- end to end on the tiny zoo ------------------------------------------------------------------------

SMALL = ["--tasks", "2", "--seeds", "3", "--steps", "3", "images_per_class=20", "finetune.tasks=1", "finetune.max_steps=5",
         "hypernet.steps=4", "hypernet.width=16", "novelty.tasks=2", "diversity.tasks=2", "diversity.samples=2", "diversity.steps=[2]",
         "bootstrap=200"]
RUN_BASELINES = [b for b in BASELINES if b != "zeroshot"]  # the tiny generator has no projector


@pytest.fixture(scope="module")
def eval_run(tiny_zoo, tiny_run, tmp_path_factory):
    from tina.cli import main as cli_main

    out = tmp_path_factory.mktemp("eval") / "out"
    argv = ["eval", "--checkpoint", str(tiny_run / "bundle"), "--zoo", str(tiny_zoo), "--out", str(out), *SMALL]
    assert cli_main(argv) == 0
    return out


def test_results_schema(eval_run):
    r = json.loads((eval_run / "results.json").read_text())
    assert r["format"] == "tina-eval/1" and r["seeds"] == [0, 1, 2]
    assert set(r["splits"]) == {"train", "unseen_combo", "unseen_class"}
    for split in r["splits"].values():
        assert split["tasks"] == 2
        assert set(split["baselines"]) == set(RUN_BASELINES)
        for b in RUN_BASELINES:
            assert 0.0 <= split["baselines"][b]["mean"] <= 1.0
        assert set(split["generated"]) == set(FORMS)  # random text, mismatched, shuffled... all reported
        for stats in split["generated"].values():
            assert 0.0 <= stats["mean"] <= 1.0 and stats["n_seeds"] == 3 and len(stats["per_seed"]) == 3
        h = split["headline"]
        assert {"generated", "oracle", "selection", "ratio_to_oracle", "gain_captured"} <= set(h)
        assert {"shuffled_vs_names", "names_minus_random_text", "names_minus_mismatched"} <= set(h["checks"])
        for row in split["by_k"].values():
            assert {"n", "generated", "chance", *RUN_BASELINES} <= set(row)
        t = split["per_task"][0]
        assert len(t["generated"]["names"]) == 3 and "retrieved" in t
        diffs = h["differences"]
        assert {"generated - retrieval", "generated - selection", "generated - hypernet", "oracle - generated"} <= set(diffs)
        for d in diffs.values():
            assert d["lo"] <= d["diff"] <= d["hi"] and d["n"] == 2
    n_train = json.loads((Path(r["zoo"]) / "manifest.json").read_text())["counts"]["train"]
    assert r["zoo_models_searched"] == n_train  # retrieval and composition saw the whole training zoo
    assert r["hypernet"]["steps"] == 4 and r["hypernet"]["source"] == "config"
    nv = r["novelty"]["splits"]["unseen_combo"]
    assert nv["models"] == 2 * 3 and sum(nv["counts"].values()) == 6
    per_model = [m for v in r["novelty"]["per_model"].values() for m in v]
    assert any("agreement" in m for m in per_model)  # a model with no training model holding its classes has none
    assert all(0.0 <= m["agreement"] <= 1.0 for m in per_model if "agreement" in m)
    dv = r["diversity"]
    assert dv["split"] == "unseen_combo" and dv["samples"] == 2 and set(dv["by_steps"]) == {"2"}
    assert 0.0 <= dv["by_steps"]["2"]["disagreement"] <= 1.0 and 0.0 <= dv["mean_model"]["acc"] <= 1.0
    for gap in ("single_minus_mean_model", "ensemble_minus_mean_model"):  # each gap with its paired interval over tasks
        lo, hi = dv["by_steps"]["2"][f"{gap}_ci"]
        assert lo <= dv["by_steps"]["2"][gap] <= hi
    assert any("zeroshot skipped" in n for n in r["notes"])
    assert r["headline"]["split"] == "unseen_combo"
    fb = r["finetune_budget"]
    assert fb["tasks"] == 1 and fb["max_steps"] == 5 and fb["per_task"][0]["steps"][0] == 0
    assert any("image prompts skipped" in n for n in r["notes"])  # the tiny generator has no projector


def test_markdown_and_plots_exist(eval_run):
    md = (eval_run / "results.md").read_text()
    assert "| oracle |" in md and "**generated: names**" in md and "random_text" in md and "gain captured" in md
    assert "| compose_zoo_body |" in md and "| hypernet |" in md and "95% interval" in md
    assert "## Memorization" in md and "## Diversity" in md and "## Hypernetwork baseline" in md
    for name in ("accuracy_by_split.png", "prompt_forms.png", "accuracy_vs_k.png", "finetune_budget.png"):
        assert (eval_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (eval_run / "eval_config.yaml").is_file()


def test_image_prompts_with_a_projector(tiny_zoo, tiny_run, tmp_path):
    """An (untrained) projector inside a copy of the generator: image_1shot is generated and scored."""
    from dataclasses import asdict

    from tina import projector

    from tina.bundle import load_bundle, save_bundle
    from evaluation import evaluate

    bundle = load_bundle(tiny_run / "bundle")
    cfg = projector.ProjectorConfig(width=4, image=bundle.image.to_dict(), embed_dim=bundle.vocab_emb.shape[1],
                                    text_encoder=bundle.text_encoder, dataset=bundle.dataset, classes=list(bundle.vocab))
    net = projector.ImageProjector.from_config(cfg)
    bundle.projector = {k: v.detach().clone() for k, v in net.state_dict().items()}
    bundle.projector_config = {"format": projector.PROJECTOR_FORMAT, **asdict(cfg), "metrics": {}}
    path = save_bundle(bundle, tmp_path / "bundle")
    r = evaluate(load_eval_config(None, [f"checkpoint={path}", f"zoo={tiny_zoo}", f"out={tmp_path / 'out'}",
                                         "splits=[unseen_combo]", "forms=[names]", "image_shots=[1]", "tasks=2", "seeds=1",
                                         "steps=2", "images_per_class=10", "finetune.tasks=0", "baselines=[selection,zeroshot]",
                                         "novelty.tasks=0", "diversity.tasks=0",
                                         "plots=false"]))
    stats = r["splits"]["unseen_combo"]["generated"]["image_1shot"]
    assert 0.0 <= stats["mean"] <= 1.0 and stats["n_tasks"] == 2
    assert 0.0 <= r["splits"]["unseen_combo"]["baselines"]["zeroshot"]["mean"] <= 1.0  # images -> text space -> nearest name
    assert r["sizes"][0]["zeroshot"] > r["sizes"][0]["generated_model"]  # the projector is larger than a cnn-5k


# ---- benchmarks that share this machinery ------------------------------------------------------------------


def test_scaling_subset_zoo_keeps_the_first_models(tiny_zoo, tmp_path):
    from benchmarks.scaling import subset_zoo
    from tina.training.data import load_split, read_manifest

    sub = subset_zoo(Path(tiny_zoo), 5, tmp_path / "sub")
    assert read_manifest(sub)["counts"]["train"] == 5
    full, part = load_split(tiny_zoo, "train"), load_split(sub, "train")
    assert [m["key"] for m in part] == [m["key"] for m in full[:5]]
    assert all(torch.equal(a["params"], b["params"]) for a, b in zip(part, full))
    assert len(load_split(sub, "unseen_combo")) == len(load_split(tiny_zoo, "unseen_combo"))  # other splits linked


@pytest.mark.parametrize("module", ["benchmarks.__main__", "benchmarks.train_throughput", "benchmarks.generation", "benchmarks.scaling"])
def test_benchmark_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out


def test_fresh_clone_eval_names_the_zoo_to_build(tmp_path, monkeypatch, capsys):
    """`make eval` on a fresh clone: one line on stderr, exit 2, naming the exact zoo command."""
    from tina.cli import main as cli_main

    monkeypatch.chdir(tmp_path)  # no zoos/ here
    assert cli_main(["eval", str(CONFIGS / "fashion_mnist.yaml"), "--checkpoint", "default"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`tina zoo build configs/zoo/fashion_mnist.yaml out=zoos/fashion_mnist`" in err


def test_unrelated_words_are_distinct_even_for_more_classes_than_words():
    import random

    from evaluation.prompts import UNRELATED_WORDS, unrelated_words

    for k in (2, len(UNRELATED_WORDS), 32):
        words = unrelated_words(random.Random(k), k)
        assert len(words) == k and len(set(words)) == k
