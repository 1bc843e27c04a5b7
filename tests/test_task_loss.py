"""The task loss (tina/training/task_loss.py): the cross-entropy of the classifier a user would get,
on train images, its gradient, which batch rows it scores, and a training run that uses it."""

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tina.training.task_loss import TaskLoss, TaskLossConfig

ROOT = Path(__file__).resolve().parent.parent


def _task(bundle, ds, names=("sneaker", "sandal", "bag")):
    """Conditions (1, k, E) of plain class names, their dataset ids (1, k) and k."""
    from tina.sample import Tina

    tina = Tina(bundle)
    task = tina.make_task(classes=list(names))
    ids = torch.tensor([[ds.classes.index(c) for c in task.classes]])
    return task.cond[None].float(), ids, len(task.classes)


def test_task_loss_is_the_cross_entropy_of_the_model_a_user_gets(random_generator, fashion_mnist):
    """Same tokens, same images: TaskLoss's number equals the cross-entropy of the TargetNet that
    tina/weights.py assembles (strict load, soft selection origin) from those tokens."""
    from tina.bundle import load_bundle
    from tina.weights import assemble, tokens_to_flat

    b = load_bundle(random_generator)
    cond, ids, k = _task(b, fashion_mnist)
    tl = TaskLoss(TaskLossConfig(weight=1.0, images_per_class=5), b.layout, b.target, fashion_mnist, b.anchor, b.base)
    pred = torch.randn(1, b.layout.num_tokens(k), b.layout.token_size) * 0.5
    torch.manual_seed(3)
    got = tl(pred, cond, None, ids, torch.tensor([0]))
    torch.manual_seed(3)
    x, y = tl.images(ids[0].tolist())
    net = assemble(b.target, b.image, b.layout, tokens_to_flat(b.layout, pred[0], cond[0], b.anchor), ["a", "b", "c"], b.base)
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert set(fashion_mnist.train_y[torch.cat([tl.by_class[c] for c in ids[0].tolist()]).numpy()]) == set(ids[0].tolist())
    with torch.no_grad():
        assert float(got) == pytest.approx(float(F.cross_entropy(net(x), y)), rel=1e-5)


def test_task_loss_gradient_makes_the_generated_classifier_better(random_generator, fashion_mnist):
    """Descending the task loss on the tokens alone (no zoo target) raises the assembled model's
    accuracy on held-out test images: the gradient reaches the tokens through the whole
    tokens -> weights -> logits path with the right sign."""
    from tina.bundle import load_bundle
    from tina.training.accuracy import accuracy, task_test_set
    from tina.weights import assemble, tokens_to_flat

    b = load_bundle(random_generator)
    cond, ids, k = _task(b, fashion_mnist, ("trouser", "bag"))
    tl = TaskLoss(TaskLossConfig(weight=1.0, images_per_class=16), b.layout, b.target, fashion_mnist, b.anchor, b.base)
    torch.manual_seed(1)
    pred = (0.3 * torch.randn(1, b.layout.num_tokens(k), b.layout.token_size)).requires_grad_()  # a random classifier

    def test_acc():
        flat = tokens_to_flat(b.layout, pred.detach()[0], cond[0], b.anchor)
        return accuracy(assemble(b.target, b.image, b.layout, flat, ["t", "b"], b.base), *task_test_set(fashion_mnist, ids[0].tolist(), 200))

    before = test_acc()
    opt = torch.optim.Adam([pred], lr=0.05)
    torch.manual_seed(0)
    for _ in range(30):
        loss = tl(pred, cond, None, ids, torch.tensor([0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = test_acc()
    assert after > before + 0.05


def test_task_loss_scores_conditioned_rows_at_high_noise_only(random_generator, fashion_mnist):
    """Rows whose condition was dropped, or whose timestep is below the noisiest 5% (the default min_t),
    keep the plain diffusion loss; at most cfg.tasks rows are scored; min_t 0 scores every timestep."""
    from tina.bundle import load_bundle

    b = load_bundle(random_generator)
    tl = TaskLoss(TaskLossConfig(weight=1.0, tasks=2), b.layout, b.target, fashion_mnist, b.anchor, b.base, num_train_timesteps=1000)
    t = torch.tensor([999, 10, 960, 950, 949, 999])
    uncond = torch.tensor([False, False, True, False, False, False])
    assert tl.chosen(t, uncond).tolist() == [0, 3]
    assert TaskLoss(TaskLossConfig(tasks=8), b.layout, b.target, fashion_mnist, b.anchor, b.base).chosen(t, uncond).tolist() == [0, 3, 5]
    every = TaskLoss(TaskLossConfig(tasks=8, min_t=0), b.layout, b.target, fashion_mnist, b.anchor, b.base)
    assert every.chosen(t, uncond).tolist() == [0, 1, 3, 4, 5]  # min_t 0: every conditioned row


@pytest.fixture(scope="module")
def task_run(tiny_zoo, tmp_path_factory):
    """A few steps of training with the task loss on the tiny zoo."""
    from tina.config import load_config
    from tina.training.train import TrainConfig, train

    from conftest import TINY_TRAIN

    out = tmp_path_factory.mktemp("task") / "run"
    cfg = ROOT / "configs" / "train" / "fashion_mnist.yaml"
    train(load_config(TrainConfig, cfg, [f"zoo={tiny_zoo}", f"out={out}", "trainer.max_steps=4", *TINY_TRAIN,
                                         "trainer.log_every=1", "task_loss.weight=1", "diffusion.high_noise_fraction=1"]))
    return out


def test_training_with_task_loss_logs_it_beside_the_diffusion_loss(task_run):
    """task_loss.weight > 0: a run trains, logs train/task_ce and train/mse (finite), and writes its bundle."""
    assert (task_run / "bundle" / "bundle.json").is_file()
    rows = list(csv.DictReader(open(next(task_run.glob("logs/*/metrics.csv")))))
    ce = [float(r["train/task_ce"]) for r in rows if r.get("train/task_ce")]
    assert len(ce) >= 3 and all(math.isfinite(v) and v > 0 for v in ce)
    assert any(r.get("train/mse") for r in rows)


def test_hypernet_baseline_trains_with_the_generators_task_loss(task_run, tiny_zoo, fashion_mnist):
    """The hypernetwork baseline takes the generator's recipe: a generator trained with a task loss gets a
    hypernet trained with the same weight over as many final steps as the generator's own run (all 3 here,
    the run had 4), and one clear error when no images are given for it."""
    from evaluation.config import HypernetConfig
    from evaluation.hypernet import train_hypernet
    from tina.bundle import load_bundle

    b = load_bundle(task_run / "bundle")
    cfg = HypernetConfig(steps=3, batch_size=4, width=16, workers=0)
    net, record = train_hypernet(b, tiny_zoo, cfg, dataset=fashion_mnist)
    assert record["task_loss_weight"] == 1.0 and record["task_loss_steps"] == 3 and math.isfinite(record["final_loss"])
    with pytest.raises(ValueError, match="task loss"):
        train_hypernet(b, tiny_zoo, cfg)
