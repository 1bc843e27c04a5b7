"""zoo_builder: task sampling, batched == per-model training, shards, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tina.config import load_config
from tina.targets import CNN5kBody, ImageSpec, get_target
from zoo_builder import fit
from zoo_builder.config import FinetuneConfig, TasksConfig, ZooConfig
from zoo_builder.tasks import sample_tasks

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "zoo" / "tiny.yaml"


# ---- tasks ---------------------------------------------------------------------------------------


def test_task_sampler_is_deterministic_and_splits_are_disjoint():
    cfg = TasksConfig(train=300, unseen_combo=40, unseen_class=20, held_out_classes=3, k_min=2, k_max=6, seed=7)
    a, b = sample_tasks(12, cfg), sample_tasks(12, cfg)
    assert a == b
    assert sample_tasks(12, replace(cfg, seed=8)) != a
    held = set(a.held_out_classes)
    assert len(held) == 3
    ids = [t.task_id for t in a.tasks]
    assert len(ids) == len(set(ids)) == 360
    train_sets = {frozenset(t.classes) for t in a.split("train")}
    for t in a.tasks:
        assert cfg.k_min <= len(t.classes) <= cfg.k_max and len(set(t.classes)) == len(t.classes)
    for t in a.split("train") + a.split("unseen_combo"):
        assert not held & set(t.classes), "held-out classes must never appear in train / unseen_combo tasks"
    combos = [frozenset(t.classes) for t in a.split("unseen_combo")]
    assert len(combos) == 40 and not train_sets & set(combos), "unseen combos must never occur in train as sets"
    assert all(held & set(t.classes) for t in a.split("unseen_class"))
    d = a.to_dict()
    assert type(a).from_dict(json.loads(json.dumps(d))) == a


def test_val_split_is_disjoint_and_leaves_the_test_split_unchanged():
    base = TasksConfig(train=300, unseen_combo=40, k_min=2, k_max=6, seed=3)
    with_val = sample_tasks(10, replace(base, val=25))
    val = [frozenset(t.classes) for t in with_val.split("val")]
    combo = [frozenset(t.classes) for t in with_val.split("unseen_combo")]
    train = {frozenset(t.classes) for t in with_val.split("train")}
    assert len(val) == len(set(val)) == 25
    assert not set(val) & train and not set(val) & set(combo), "val sets must be in neither train nor the test split"
    # the test split keeps its tasks when a val split is added
    assert [t.classes for t in with_val.split("unseen_combo")] == [t.classes for t in sample_tasks(10, base).split("unseen_combo")]
    assert type(with_val).from_dict(json.loads(json.dumps(with_val.to_dict()))) == with_val


def test_task_sampler_keeps_every_size_for_train():
    # 10 classes, k up to 10: the single 10-class set can never be held out.
    plan = sample_tasks(10, TasksConfig(train=2000, unseen_combo=200, k_min=2, k_max=10))
    sizes = {len(t.classes) for t in plan.split("train")}
    assert sizes == set(range(2, 11))
    assert all(len(t.classes) < 10 for t in plan.split("unseen_combo"))


# ---- batched training == per-model training --------------------------------------------------------


def _nets(ks, image, seed=0):
    torch.manual_seed(seed)
    return [get_target("cnn-5k").build(k, image) for k in ks]


IMPLS = [("bmm", "auto"), ("grouped", "auto"), ("grouped", "torch")]  # grouped + auto = the C kernels where they build


@pytest.mark.parametrize("impl,kern", IMPLS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_batched_cnn_equals_per_model_training(channels, size, impl, kern):
    """Three models with different k: stacked forward + Adam steps match separate TargetNets (every conv backend)."""
    image = ImageSpec(channels, size, (0.3,) * channels, (0.35,) * channels)
    ks, B, steps = [2, 5, 3], 12, 3
    nets = _nets(ks, image)
    net = fit.StackedCNN5k(channels, size, conv_impl=impl, kernels=kern)
    K = max(ks)
    params = net.pack([n.state_dict() for n in nets], K)
    kmask = torch.arange(K)[None] < torch.tensor(ks)[:, None]
    trainer = fit.StackedTrainer(net, params, kmask, lr=3e-3)
    opts = [torch.optim.Adam(n.parameters(), lr=3e-3) for n in nets]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(len(ks), B, channels, size, size, generator=gen)
        x[:, :, :, : size // 4] = 0  # flat regions: ties in the max-pools must resolve like max_pool2d
        y = torch.stack([torch.randint(0, k, (B,), generator=gen) for k in ks])
        xn = ((x - 0.3) / 0.35).permute(0, 1, 3, 4, 2).contiguous()  # (G, B, H, W, C) normalised
        loss = trainer.step(xn, y)
        for i, n in enumerate(nets):
            ref = F.cross_entropy(n(x[i]), y[i])
            opts[i].zero_grad()
            ref.backward()
            opts[i].step()
            assert loss[i].item() == pytest.approx(ref.item(), abs=1e-5)
    x = torch.rand(6, channels, size, size, generator=gen)
    xn = ((x - 0.3) / 0.35).permute(0, 2, 3, 1)[None].expand(len(ks), -1, -1, -1, -1).contiguous()
    logits = net.logits(params, xn)
    for i, n in enumerate(nets):
        sd = net.state_dict(params, i, ks[i])
        for name, ref in n.state_dict().items():
            torch.testing.assert_close(sd[name], ref, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(logits[i, :, : ks[i]], n(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_input_gradient_matches_autograd(dtype):
    """Both input-gradient paths (float32: row partial sums; bf16: im2col of dZ) equal conv2d's backward."""
    G, B, H, W, Cin, Co = 2, 3, 7, 7, 8, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(G, B, Cin, H, W, generator=gen, requires_grad=True)
    w = torch.randn(G, Co, Cin, 3, 3, generator=gen)
    dZ = torch.randn(G, B, Co, H, W, generator=gen)
    for g in range(G):
        (F.conv2d(x[g], w[g], padding=1) * dZ[g]).sum().backward()
    stacked_w = w.permute(0, 3, 4, 2, 1).reshape(G, 9 * Cin, Co)  # (G, (dy, dx, c), o)
    flat_dZ = dZ.permute(0, 1, 3, 4, 2).reshape(G, B * H * W, Co)
    got = fit._conv3_input_grad(flat_dZ.to(dtype), stacked_w.to(dtype), B, H, W).float()  # (G*B, H, W, Cin)
    ref = x.grad.reshape(G * B, Cin, H, W).permute(0, 2, 3, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((got - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("impl,kern", IMPLS)
def test_bf16_batched_training_tracks_float32(impl, kern):
    """precision=bf16: same losses as float32 to bf16 accuracy, and the models learn as well."""
    image = ImageSpec(1, 28, (0.3,), (0.35,))
    ks, B, steps = [2, 4, 3], 32, 30
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        nets = _nets(ks, image)
        net = fit.StackedCNN5k(1, 28, dtype, conv_impl=impl, kernels=kern)
        params = net.pack([n.state_dict() for n in nets], max(ks))
        trainer = fit.StackedTrainer(net, params, torch.arange(max(ks))[None] < torch.tensor(ks)[:, None], lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            y = torch.stack([torch.randint(0, k, (B,), generator=gen) for k in ks])
            x = torch.rand(len(ks), B, 28, 28, 1, generator=gen) * 0.5
            for i in range(4):  # class c lights up its own horizontal band
                x[..., 7 * i : 7 * i + 7, :, :] += (y == i).float()[..., None, None, None]
            losses.append(trainer.step(x, y))
        assert all(p.dtype == torch.float32 for p in params.values())  # master weights stay float32
        runs[dtype] = torch.stack(losses)
    f32, b16 = runs[torch.float32], runs[torch.bfloat16]
    torch.testing.assert_close(b16[0], f32[0], atol=2e-2, rtol=2e-2)
    assert (b16[-5:].mean(0) < 0.5 * b16[:3].mean(0)).all()  # learned
    assert (b16[-5:].mean(0) - f32[-5:].mean(0)).abs().max() < 0.1


def test_minibatches_come_from_each_models_own_classes():
    labels = torch.arange(50) % 5
    order, start, count = fit.class_index(labels, 5, 0, torch.Generator().manual_seed(0))
    data = fit.FitData(labels, order, start, count, labels, order, start, count, torch.zeros(1), torch.ones(1), torch.zeros(50, 1))
    tasks = [[3, 1], [0, 4, 2]]
    ids, ks, _ = fit.class_tables(tasks, 3)
    idx, y = fit.sample_batch(data, ids, ks, 200, fit.model_keys(1, [0, 1]), step=0)
    for m, t in enumerate(tasks):
        assert set(y[m].tolist()) == set(range(len(t)))
        assert torch.equal(labels[idx[m]], torch.tensor(t)[y[m]])
    # drawn many steps per call (as fit_group does) == one call per step; and steps differ
    keys = fit.model_keys(1, [0, 1])
    chunked = list(fit.minibatches(data, ids, ks, 16, keys, 7, chunk=3))
    assert len(chunked) == 7
    for step, (ci, cy) in enumerate(chunked):
        si, sy = fit.sample_batch(data, ids, ks, 16, keys, step)
        assert torch.equal(ci, si) and torch.equal(cy, sy)
    assert not torch.equal(chunked[0][0], chunked[1][0])


def test_proportional_sampling_draws_classes_as_often_as_the_training_set_has_them():
    # imbalanced pool: class c has 10 * (c + 1) images
    labels = torch.cat([torch.full((10 * (c + 1),), c) for c in range(4)])
    order, start, count = fit.class_index(labels, 4, 0, torch.Generator().manual_seed(0))
    data = fit.FitData(labels, order, start, count, labels, order, start, count, torch.zeros(1), torch.ones(1), torch.zeros(len(labels), 1))
    tasks = [[3, 0], [1, 2, 0]]
    ids, ks, _ = fit.class_tables(tasks, 3)
    keys = fit.model_keys(0, [0, 1])
    idx, y = fit.sample_batch(data, ids, ks, 4000, keys, torch.arange(3), sampling="proportional")  # (S, G, B)
    assert idx.shape == (3, 2, 4000)
    for m, t in enumerate(tasks):
        assert torch.equal(labels[idx[:, m]], torch.tensor(t)[y[:, m]])  # the label is the image's class
        share = torch.bincount(y[:, m].flatten(), minlength=len(t)).float() / y[:, m].numel()
        want = torch.tensor([10.0 * (c + 1) for c in t]) / sum(10.0 * (c + 1) for c in t)
        assert float((share - want).abs().max()) < 0.02, (share, want)
        assert set(idx[:, m].flatten().tolist()) == set(torch.nonzero(torch.isin(labels, torch.tensor(t))).flatten().tolist())
    # balanced sampling of the same pool gives each class 1/k
    _, yb = fit.sample_batch(data, ids, ks, 4000, keys, 0)
    assert abs(float((yb[0] == 0).float().mean()) - 0.5) < 0.03


def test_counter_uniforms_are_uniform_and_a_function_of_key_step_and_column():
    keys = fit.model_keys(0, range(64))
    u = fit.counter_uniform(keys, 3, 0, 512)
    assert u.shape == (64, 512) and u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    # deciles: each holds ~10% (32768 draws; 5 sigma ~ 0.8 points)
    counts = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert float((counts - 0.1).abs().max()) < 0.008
    # a model's stream is its own: the same key gives the same numbers in any group, other steps/streams differ
    torch.testing.assert_close(fit.counter_uniform(keys[5:6], 3, 0, 512), u[5:6], rtol=0, atol=0)
    assert not torch.equal(fit.counter_uniform(keys, 4, 0, 512), u)
    assert not torch.equal(fit.counter_uniform(keys, 3, 1, 512), u)
    assert not torch.equal(fit.model_keys(1, range(64)), keys)
    # neighbouring models are uncorrelated
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.1


def test_grouping_does_not_change_the_models():
    """Per-model random streams: one group of three models == a group of two + a group of one."""
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    images = torch.randint(0, 256, (200, 8, 8, 1), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    order, start, count = fit.class_index(labels, 4, 0, g)
    net = fit.StackedCNN5k(1, 8)
    generic = get_target("cnn-5k").build(4, ImageSpec(1, 8, (0.5,), (0.25,))).state_dict()
    feats = torch.randn(200, CNN5kBody.feature_dim(8))
    data = fit.FitData(images, order, start, count, images, order, start, count, torch.tensor([0.5]), torch.tensor([0.25]), feats)
    cfg = FinetuneConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=1, eval_per_class=10, eval_chunk=16)
    tasks, numbers = [[0, 1], [3, 2, 1], [2, 0]], [7, 8, 9]
    whole = fit.fit_group(net, generic, tasks, fit.model_keys(0, numbers), data, cfg)
    parts = [fit.fit_group(net, generic, tasks[:2], fit.model_keys(0, numbers[:2]), data, cfg, models_per_call=1),
             fit.fit_group(net, generic, tasks[2:], fit.model_keys(0, numbers[2:]), data, cfg)]
    split = [sd for r in parts for sd in r.state_dicts]
    for a, b in zip(whole.state_dicts, split):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole.state_dicts[0]["body.conv1.weight"], generic["body.conv1.weight"])  # it trained


# ---- a tiny real build ---------------------------------------------------------------------------

def _tiny_cfg(out: Path, *extra: str) -> ZooConfig:
    return load_config(ZooConfig, TINY, [f"out={out}", *extra])


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, fashion_mnist):
    from zoo_builder.build import build

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    man = build(_tiny_cfg(out))
    assert man is not None
    return out


def _samples(zoo: Path):
    """Every sample's members as stored (.npy without pickle, .json), grouped by key."""
    import io
    import tarfile

    man = json.loads((zoo / "manifest.json").read_text())
    samples = {}
    for n in (n for split in man["shards"].values() for n in split):
        with tarfile.open(zoo / n) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                s = samples.setdefault(key, {"__key__": key})
                s[ext] = np.load(io.BytesIO(data), allow_pickle=False) if ext.endswith(".npy") else json.loads(data)
    return man, list(samples.values())


def test_shards_round_trip(tiny_zoo):
    from tina.layout import ParamLayout
    from tina.prompts import NUM_VARIANTS

    man, samples = _samples(tiny_zoo)
    assert man["format"] == "tina-zoo/1" and man["target"] == "cnn-5k"
    layout = ParamLayout.from_dict(man["layout"])
    assert layout.fingerprint == man["layout_fingerprint"]
    assert len(samples) == man["counts"]["models"] == len(man["tasks"])
    image = ImageSpec.from_dict(man["dataset"]["image"])
    for s in samples:
        flat = torch.from_numpy(np.asarray(s["params.npy"]))
        assert flat.dtype == torch.float32
        ids, names = s["classes.json"]["ids"], s["classes.json"]["names"]
        k = len(ids)
        assert ids == man["tasks"][s["__key__"]] and names == [man["dataset"]["classes"][c] for c in ids]
        assert flat.shape == (layout.num_params(k),)
        net = get_target("cnn-5k").build(k, image)
        net.load_state_dict(layout.unflatten(flat, k), strict=True)  # a complete, loadable model
        torch.testing.assert_close(layout.flatten(net.state_dict()), flat)
        assert s["emb.npy"].dtype == np.float16 and s["emb.npy"].shape[:2] == (k, NUM_VARIANTS)
        assert len(s["prompts.json"]) == k and s["prompts.json"][0][0] == names[0]
        m = s["metrics.json"]
        assert m["task_id"] == s["__key__"] and m["k"] == k and 0 <= m["oracle_acc"] <= 1
    vocab_ids = {c for s in samples for c in s["classes.json"]["ids"]}
    assert vocab_ids <= set(range(len(man["dataset"]["classes"])))
    assert (tiny_zoo / "generic.safetensors").is_file() and man["generic"]["test_acc"] > 0.3
    assert not list(tiny_zoo.glob("*.tmp"))


def test_fine_tuning_beats_classifier_selection(tiny_zoo):
    _, samples = _samples(tiny_zoo)
    oracle = np.mean([s["metrics.json"]["oracle_acc"] for s in samples])
    selection = np.mean([s["metrics.json"]["selection_acc"] for s in samples])
    assert oracle >= selection, (oracle, selection)


def test_build_resumes_after_sigkill_without_losing_or_duplicating(tiny_zoo, tmp_path):
    """Kill a build (SIGKILL) right after its first shard lands, resume it, compare with the clean build."""
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("generic.safetensors", "generic.json", "vocab.safetensors"):  # reused, as after a kill
        shutil.copy(tiny_zoo / name, out / name)
    cmd = [sys.executable, "-m", "zoo_builder", "build", str(TINY), f"out={out}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a loaded machine can take minutes to import torch
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished and not (out / "manifest.json").exists(), "the kill should land mid-build"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    man, samples = _samples(out)
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(man["tasks"]) and len(keys) == len(set(keys))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tina-tmp-*"))  # the killed writer's temporaries are gone
    # Per-model random streams: every shard equals the one the uninterrupted build wrote.
    for name in sorted(p.name for p in out.glob("*.tar")):
        assert (out / name).read_bytes() == (tiny_zoo / name).read_bytes(), name


def test_groups_spanning_shards_build_the_same_zoo(tiny_zoo, tmp_path):
    """The GPU path's grouping (one worker, groups that span shards) on the CPU: the same models."""
    from zoo_builder.build import build, shard_batches

    shards = [SimpleNamespace(tasks=(0,) * 10) for _ in range(5)]
    assert [len(b) for b in shard_batches(shards, 25)] == [3, 2]  # shards batched until a group is full
    assert [len(b) for b in shard_batches(shards, 1)] == [1] * 5
    out = tmp_path / "grouped"
    out.mkdir()
    for name in ("generic.safetensors", "generic.json", "vocab.safetensors"):
        shutil.copy(tiny_zoo / name, out / name)
    man = build(_tiny_cfg(out, "runtime.workers=1", "runtime.group_size=25", "runtime.images_per_call=0"))
    assert man is not None
    (_, ref), (_, got) = _samples(tiny_zoo), _samples(out)
    ref, got = {s["__key__"]: s for s in ref}, {s["__key__"]: s for s in got}
    assert ref.keys() == got.keys()
    for key, s in ref.items():
        # other group shapes sum in other orders (oneDNN and the C kernels block by group); over the fine-tuning
        # steps those 1-ulp differences grow to ~1e-4 on weights of ~0.1-1, while mixing two models' data or
        # gradients would move them by 1e-2 and more
        np.testing.assert_allclose(got[key]["params.npy"], s["params.npy"], rtol=1e-3, atol=2e-4, err_msg=key)
        if s["metrics.json"]["split"] == "unseen_class":
            # a held-out class borrows its nearest known class's row: when both are in the task their logits tie
            # exactly, and a 1-ulp difference from another group shape breaks the tie the other way
            assert abs(got[key]["metrics.json"]["selection_acc"] - s["metrics.json"]["selection_acc"]) <= 0.02
        else:
            assert got[key]["metrics.json"]["selection_acc"] == s["metrics.json"]["selection_acc"]


def test_ranks_split_shards_and_the_last_one_finalizes(tiny_zoo, tmp_path):
    from zoo_builder.build import build

    out = tmp_path / "ranks"
    out.mkdir()
    for name in ("generic.safetensors", "generic.json", "vocab.safetensors"):
        shutil.copy(tiny_zoo / name, out / name)
    cfg = _tiny_cfg(out, "tasks.train=10", "tasks.unseen_combo=0", "tasks.unseen_class=0", "shard_size=4", "finetune.steps=2")
    assert build(cfg, rank=0, world_size=2) is None  # shards 0 and 2 only: no manifest yet
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000002.tar"]
    man = build(cfg, rank=1, world_size=2)
    assert man is not None and man["counts"]["train"] == 10
    assert man["shards"]["train"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_cli_reports_config_errors(tmp_path, capsys):
    from zoo_builder.build import main

    assert main(["build", str(TINY), f"out={tmp_path}", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.gpu
def test_gpu_fit_matches_cpu():
    """The same group fine-tuned on CUDA and on the CPU: the same minibatches, so the same models up to rounding."""
    torch.manual_seed(0)
    labels = torch.arange(400) % 5
    images = torch.randint(0, 256, (400, 28, 28, 1), dtype=torch.uint8)
    order, start, count = fit.class_index(labels, 5, 0, torch.Generator().manual_seed(0))
    spec = ImageSpec(1, 28, (0.5,), (0.25,))
    generic = get_target("cnn-5k").build(5, spec).state_dict()
    feats = torch.randn(400, CNN5kBody.feature_dim(28))
    data = fit.FitData(images, order, start, count, images, order, start, count, torch.tensor([0.5]), torch.tensor([0.25]), feats)
    cfg = FinetuneConfig(steps=5, batch_size=16, lr=1e-2, warmup_steps=1, eval_per_class=20, eval_chunk=32)
    tasks = [[0, 1, 2], [4, 3], [2, 0, 1, 3]]
    keys = fit.model_keys(0, range(3))
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = fit.fit_group(fit.StackedCNN5k(1, 28), generic, tasks, keys, data, cfg)
    gpu = fit.fit_group(fit.StackedCNN5k(1, 28), generic, tasks, keys, data.to("cuda"), cfg)
    for a, b in zip(cpu.state_dicts, gpu.state_dicts):
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-3, atol=1e-4)
    assert cpu.selection_acc == pytest.approx(gpu.selection_acc, abs=1e-6)
