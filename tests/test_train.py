"""Training end to end on a tiny zoo: the data stream, one Lightning run, resume, DDP on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tina.training.data import AugmentConfig, ZooStream, collate, layout_from_manifest, load_split, read_manifest, shard_urls
from tina.errors import TinaError

ROOT = Path(__file__).parent.parent


def test_stream_batches_permute_classes_and_mix_prompts(tiny_zoo):
    """Each example permutes its classes (head rows and conditions move together) and names each class by
    its plain name with probability name_prob, else by another prompt variant; batches pad and mask."""
    import random

    from tina.training.data import make_example

    man = read_manifest(tiny_zoo)
    layout = layout_from_manifest(man)
    stream = ZooStream(shard_urls(tiny_zoo, man, "train"), layout, AugmentConfig(permute_classes=True, name_prob=0.5), seed=0)
    examples = [ex for _, ex in zip(range(12), stream)]
    batch = collate(examples, layout)
    K = max(e["k"] for e in examples)
    assert batch["x0"].shape == (12, layout.num_tokens(K), layout.token_size)
    assert batch["cond"].shape[:2] == (12, K)
    assert batch["cond_mask"].sum().item() == sum(e["k"] for e in examples)
    assert torch.all(batch["x0"][~batch["elem_mask"]] == 0)

    model = load_split(tiny_zoo, "train", limit=1)[0]
    params, emb = model["params"], model["emb"].float()  # (P,), (k, V, E)
    k, V = emb.shape[:2]
    stored_rows = params[layout.body_size:].reshape(k, layout.head_dim)
    unit = emb / emb.norm(dim=-1, keepdim=True)  # (k, V, E)
    orders, variants = set(), []
    for seed in range(12):
        ex = make_example(params, model["emb"], layout, AugmentConfig(permute_classes=True, name_prob=0.5), random.Random(seed))
        flat = layout.denormalize(layout.detokenize(ex["x0"], k), k)
        rows = flat[layout.body_size:].reshape(k, layout.head_dim)
        perm = [int((stored_rows - r).abs().sum(-1).argmin()) for r in rows]  # which stored class each row is
        assert sorted(perm) == list(range(k)) and torch.allclose(rows, stored_rows[perm], atol=1e-4)
        assert torch.allclose(flat[: layout.body_size], params[: layout.body_size], atol=1e-4)  # the body is not permuted
        for j, c in enumerate(perm):  # the condition of position j is a variant of the class whose row sits at j
            sims = unit[c] @ ex["cond"][j]  # (V,)
            assert sims.max() > 0.999
            variants.append(int(sims.argmax()))
        orders.add(tuple(perm))
    assert len(orders) > 1, "classes were never permuted"
    assert 0 in variants and any(v > 0 for v in variants), "prompts were not mixed (plain names and other variants)"
    plain = make_example(params, model["emb"], layout, AugmentConfig(permute_classes=False, name_prob=1.0), random.Random(0))
    assert torch.allclose(plain["cond"], unit[:, 0], atol=1e-3)  # no augmentation: stored order, plain names


def test_training_writes_a_loadable_bundle_with_metrics(tiny_run):
    from tina import Tina

    bundle = tiny_run / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["training"]["steps"] == 6
    for key in ("gen_acc", "oracle_acc", "selection_acc", "gain_captured"):
        assert key in meta["metrics"]
    assert (tiny_run / "config.yaml").is_file() and (bundle / "config.yaml").is_file()
    tina = Tina.from_pretrained(bundle)
    # residual=true by default; the tiny zoo holds 2 of 10 classes out of everything, the anchor too
    assert tina.bundle.anchor is not None and tina.bundle.anchor.num_classes == 8
    model = tina.generate("coat vs bag", steps=3)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 2)


def test_checkpoint_holds_everything_for_exact_resume(tiny_run, tiny_zoo):
    from tina.config import load_config
    from tina.training.train import TrainConfig, train

    from conftest import TINY_TRAIN

    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=False)  # our own file
    assert ckpt["global_step"] == 6
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("dit.") for k in keys)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    # resume two more steps: the step counter and the LR schedule continue, not restart
    cfg = ROOT / "configs" / "train" / "fashion_mnist.yaml"
    train(load_config(TrainConfig, cfg, [f"zoo={tiny_zoo}", f"out={tiny_run}", "trainer.max_steps=8", *TINY_TRAIN]))
    after = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert after["global_step"] == 8
    assert after["lr_schedulers"][0]["last_epoch"] == 8


def test_init_from_starts_at_the_bundles_weights_and_statistics(tiny_run, tiny_zoo, tmp_path):
    """init_from=BUNDLE: a fresh run whose first weights are the bundle's (lr 0 keeps them) and whose
    normalisation statistics are the bundle's, not refitted; a mismatched layout is one clear error."""
    from tina.bundle import load_bundle
    from tina.config import load_config
    from tina.training.train import TrainConfig, train

    from conftest import TINY_TRAIN

    cfg = ROOT / "configs" / "train" / "fashion_mnist.yaml"
    src = load_bundle(tiny_run / "bundle")
    out = tmp_path / "warm"
    train(load_config(TrainConfig, cfg, [f"zoo={tiny_zoo}", f"out={out}", "trainer.max_steps=2", *TINY_TRAIN,
                                         f"init_from={tiny_run / 'bundle'}", "optim.lr=1e-12", "optim.ema_decay=0"]))
    warm = load_bundle(out / "bundle")
    for k, v in src.dit.state_dict().items():
        torch.testing.assert_close(warm.dit.state_dict()[k], v, atol=1e-5, rtol=0)
    for k, v in src.layout.stats().items():
        torch.testing.assert_close(warm.layout.stats()[k], v)
    # the source's own step count (another test resumes tiny_run past its first 6 steps)
    assert warm.meta["training"]["init_from"] == str(tiny_run / "bundle")
    assert warm.meta["training"]["steps_before"] == src.meta["training"]["steps"]
    with pytest.raises(TinaError, match="init_from"):
        train(load_config(TrainConfig, cfg, [f"zoo={tiny_zoo}", f"out={tmp_path / 'bad'}", "trainer.max_steps=1", *TINY_TRAIN,
                                             f"init_from={tiny_run / 'bundle'}", "token_size=64"]))


def test_unknown_config_key_is_a_clear_error(tiny_zoo):
    from tina.config import load_config
    from tina.training.train import TrainConfig

    with pytest.raises(TinaError, match="max_stepz"):
        load_config(TrainConfig, None, ["trainer.max_stepz=3"])
    with pytest.raises(TinaError, match="generator.size"):
        load_config(TrainConfig, None, ["generator.size=DiT-XXL"])


def test_not_a_zoo(tmp_path):
    with pytest.raises(TinaError, match="not a finished zoo"):
        read_manifest(tmp_path)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_zoo, tmp_path):
    """Lightning DDP with the gloo backend: two CPU processes train one generator."""
    from conftest import TINY_TRAIN

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "tina.cli", "train", str(ROOT / "configs/train/fashion_mnist.yaml"), f"zoo={tiny_zoo}",
           f"out={out}", "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
           *TINY_TRAIN]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world_size: 2" in r.stderr or "distributed_backend=gloo" in r.stderr or "MEMBER: 2/2" in r.stderr
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["training"]["steps"] == 3


def test_validation_measures_generated_oracle_and_selection_on_the_same_images(tiny_run, tiny_zoo):
    """Gain captured is paired: the zoo model and classifier selection are re-measured on the images
    the generated model is measured on (not taken from the zoo's own evaluation)."""
    from tina.training.accuracy import accuracy, task_test_set
    from tina.bundle import load_bundle
    from tina.training.datasets import load_dataset
    from tina.diffusion import DiffusionConfig
    from tina.training.lit_module import ValConfig, validate_generated
    from tina.weights import assemble

    b = load_bundle(tiny_run / "bundle")
    ds = load_dataset("fashion-mnist")
    models = load_split(tiny_zoo, "unseen_combo", limit=3)
    cfg = ValConfig(tasks=3, images_per_class=30)
    m = validate_generated(b.dit, b.layout, b.scheduler_config, models, ds, b.target, cfg, DiffusionConfig(steps=1), b.base, b.anchor)
    oracle, select = [], []
    for mm in models:
        x, y = task_test_set(ds, mm["class_ids"], 30)
        oracle.append(accuracy(assemble(b.target, ds.image, b.layout, mm["params"], mm["classes"]), x, y))
        select.append(accuracy(assemble(b.target, ds.image, b.layout, b.anchor.origin(mm["class_ids"]), mm["classes"]), x, y))
    assert m["oracle_acc"] == pytest.approx(sum(oracle) / 3)
    assert m["selection_acc"] == pytest.approx(sum(select) / 3)


def test_validation_scores_the_models_generate_returns(tiny_run, tiny_zoo):
    """Validation and `Tina.generate_tasks` share conditions, noise and the tokens -> weights function
    (tina/weights.py): for the same class names the generated accuracy is the same number."""
    from safetensors.torch import load_file

    from tina.bundle import load_bundle
    from tina.diffusion import DiffusionConfig
    from tina.sample import Tina
    from tina.training.accuracy import accuracy, task_test_set
    from tina.training.datasets import load_dataset
    from tina.training.lit_module import ValConfig, validate_generated

    b = load_bundle(tiny_run / "bundle")
    ds = load_dataset("fashion-mnist")
    models = [m for m in load_split(tiny_zoo, "unseen_combo", limit=6) if len(m["classes"]) == 2][:2]
    assert len(models) == 2, "the tiny zoo should hold 2-class unseen combinations"
    names = load_file(tiny_zoo / "vocab.safetensors")["names"].float()  # (V, E), what the bundle's vocab_emb holds
    cfg = ValConfig(tasks=2, images_per_class=30)
    m = validate_generated(b.dit, b.layout, b.scheduler_config, models, ds, b.target, cfg, DiffusionConfig(steps=2, sampler="ddim"),
                           b.base, b.anchor, class_emb=names)
    tina = Tina(b)
    nets = tina.generate_tasks([tina.make_task(classes=mm["classes"]) for mm in models], seed=0, steps=2, sampler="ddim", guidance=1.0)
    got = [accuracy(net, *task_test_set(ds, mm["class_ids"], 30)) for net, mm in zip(nets, models)]
    assert m["gen_acc"] == pytest.approx(sum(got) / 2, abs=1e-9)


# ---- distributed runs: only rank zero validates and writes ---------------------------------------


def test_only_rank_zero_writes_the_run_config(tmp_path, monkeypatch):
    import tina.training.train as T
    from tina.config import load_config
    from tina.errors import TinaError

    cfg = load_config(T.TrainConfig, None, [f"zoo={tmp_path / 'no-zoo'}", f"out={tmp_path / 'run'}"])
    monkeypatch.setattr(T, "_rank", lambda: (1, 2))
    with pytest.raises(TinaError):  # the missing zoo stops both ranks, after the config step
        T.train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
    monkeypatch.setattr(T, "_rank", lambda: (0, 2))
    with pytest.raises(TinaError):
        T.train(cfg)
    # rank zero writes its config only once the zoo has passed its checks: a bad zoo leaves nothing behind
    # (test_training_writes_a_loadable_bundle_with_metrics checks the config of a run that trains)
    assert not (tmp_path / "run").exists()


def test_only_rank_zero_validates(monkeypatch):
    from types import SimpleNamespace

    import tina.training.lit_module as M

    calls = []
    monkeypatch.setattr(M, "validate_generated", lambda *a, **k: calls.append(1) or {})
    for zero in (False, True):
        fake = SimpleNamespace(val_models=[{}], dataset=object(), trainer=SimpleNamespace(sanity_checking=False, is_global_zero=zero),
                               ema=None, layout=None, sched_config=None, target=None, val_cfg=None, diffusion=None,
                               anchor=None, class_emb=None, base=None, global_step=0, log=lambda *a, **k: None)
        M.TinaLitModule.on_validation_epoch_end(fake)
    assert calls == [1]


def test_bundle_line_printed_once_by_rank_zero(tmp_path, monkeypatch, capsys):
    import tina.training.train as T

    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: x\n")
    monkeypatch.setattr(T, "train", lambda c: None)  # another rank: nothing to report
    assert T.main([str(cfg)]) == 0 and "generator bundle" not in capsys.readouterr().out
    monkeypatch.setattr(T, "train", lambda c: tmp_path / "bundle")
    assert T.main([str(cfg)]) == 0 and capsys.readouterr().out.count("generator bundle:") == 1
