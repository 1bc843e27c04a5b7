"""The generic batched trainer (zoo_builder/stack.py): every registered target trains in a group exactly
as it would alone, as an nn.Module with its own Adam."""

import pytest
import torch
import torch.nn.functional as F

from tina.targets import ImageSpec, Target, get_target, registered
from zoo_builder import fit
from zoo_builder.stack import FuncStack

IMAGE = ImageSpec(1, 16, (0.3,), (0.35,))


@pytest.mark.parametrize("target", [*registered(), "resnet18+linear"])
def test_batched_training_equals_per_model_training(target):
    """Three models with different k, three Adam steps: losses, weights and logits match separate TargetNets."""
    spec = get_target(target)
    ks, B, steps, lr = [2, 5, 3], 8, 3, 3e-3
    torch.manual_seed(0)
    nets = [spec.build(k, IMAGE).eval() for k in ks]
    for n in nets[1:]:  # a head-on-backbone zoo shares one frozen backbone
        n.load_state_dict({k: v for k, v in nets[0].state_dict().items() if not spec.is_generated(k)}, strict=False)
    D = nets[0].head.in_features
    stack = FuncStack(spec, IMAGE, feature_dim=D)
    K = max(ks)
    params = stack.pack([n.state_dict() for n in nets], K)
    assert set(params) == {n for n, _ in nets[0].named_parameters() if spec.is_generated(n)}
    kmask = torch.arange(K)[None] < torch.tensor(ks)[:, None]
    trainer = fit.StackedTrainer(stack, params, kmask, lr=lr)
    opts = [torch.optim.Adam([p for name, p in n.named_parameters() if spec.is_generated(name)], lr=lr) for n in nets]

    def stack_inputs(x):  # (G, B, C, H, W) images -> what the stack trains on
        if stack.kind == "images":
            return x
        with torch.no_grad():
            return nets[0].features(x.flatten(0, 1)).view(len(ks), x.shape[1], D)  # frozen features, computed once

    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.rand(len(ks), B, 1, 16, 16, generator=gen)
        y = torch.stack([torch.randint(0, k, (B,), generator=gen) for k in ks])
        loss = trainer.step(stack_inputs(x), y)
        for i, n in enumerate(nets):
            ref = F.cross_entropy(n(x[i]), y[i])
            opts[i].zero_grad()
            ref.backward()
            if step == 0:  # same weights: the same gradients, to float rounding
                for name, p in n.named_parameters():
                    if spec.is_generated(name):
                        torch.testing.assert_close(params[name].grad[i, : p.shape[0]], p.grad, atol=1e-6, rtol=1e-4, msg=name)
            opts[i].step()
            assert loss[i].item() == pytest.approx(ref.item(), abs=1e-5)
    x = torch.rand(len(ks), 6, 1, 16, 16, generator=gen)
    with torch.no_grad():
        logits = stack.logits(params, stack_inputs(x))
    for i, n in enumerate(nets):
        sd = stack.state_dict(params, i, ks[i])
        for name, ref in n.state_dict().items():
            if spec.is_generated(name):
                # 1e-4 << lr: Adam divides by sqrt(v), so a gradient that is zero up to rounding (a dead
                # ReLU's weight) may move by a fraction of lr on one side only; a wrong gradient moves by ~lr.
                torch.testing.assert_close(sd[name], ref, atol=1e-4, rtol=1e-4, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(logits[i, :, : ks[i]], n(x[i]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grouped", [True, False])
def test_worker_threads_sharing_a_stack_get_their_own_gradients(grouped):
    """The build fits groups on worker threads that share one FuncStack: a thread's gradients must come
    from its own weights (functional_call swaps tensors into a module, so a shared template would mix them)."""
    from concurrent.futures import ThreadPoolExecutor

    spec = get_target("cnn-5k")
    stack = FuncStack(spec, IMAGE, grouped=grouped)
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for _ in range(2):  # two groups with different weights and data, the same shapes
        torch.manual_seed(len(jobs))
        p = stack.pack([spec.build(4, IMAGE).state_dict() for _ in range(3)], 4)
        x, y = torch.rand(3, 8, 1, 16, 16, generator=gen), torch.randint(0, 4, (3, 8), generator=gen)
        jobs.append((p, x, y, torch.ones(3, 4, dtype=torch.bool)))
    refs = [stack.loss_and_grads(*j)[1] for j in jobs]

    def run(i):
        return [stack.loss_and_grads(*jobs[i])[1] for _ in range(30)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, [0, 1]))
    finally:
        torch.set_num_threads(threads)
    for ref, got in zip(refs, results):
        for g in got:
            for name in ref:
                torch.testing.assert_close(g[name], ref[name], msg=name)


@pytest.mark.parametrize("target", ["cnn-5k", "cnn-33k", "resnet20+linear"])
def test_shipped_targets_train_through_the_grouped_layout(target):
    """The fast path (zoo_builder/grouped.py) covers the shipped targets; a fall back to vmap is ~2x slower."""
    stack = FuncStack(target, IMAGE, feature_dim=64)
    assert stack.grouped(5) is not None
    assert FuncStack(target, IMAGE, feature_dim=64, grouped=False).grouped(5) is None


class _ConcatBody(torch.nn.Module):
    """Two conv branches concatenated along channels: a channel concat mixes models in the grouped layout."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(c, 2, 3, padding=1), torch.nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1).relu().mean((2, 3))  # (N, 4)


class _ConcatTarget(Target):
    name = "concat-test"
    generated = ("body.", "head.")

    def body(self, image, pretrained=False, checkpoint=None):
        return _ConcatBody(image.channels), 4


def test_a_target_outside_the_grouped_layout_falls_back_to_vmap_and_trains_the_same():
    spec = _ConcatTarget()
    stack = FuncStack(spec, IMAGE)
    assert stack.grouped(3) is None
    torch.manual_seed(0)
    nets = [spec.build(3, IMAGE) for _ in range(2)]
    p = stack.pack([n.state_dict() for n in nets], 3)
    x, y = torch.rand(2, 4, 1, 16, 16), torch.randint(0, 3, (2, 4))
    loss, grads = stack.loss_and_grads(p, x, y, torch.ones(2, 3, dtype=torch.bool))
    for i, n in enumerate(nets):
        ref = F.cross_entropy(n(x[i]), y[i])
        ref.backward()
        assert loss[i].item() == pytest.approx(ref.item(), abs=1e-6)
        for name, t in n.named_parameters():
            torch.testing.assert_close(grads[name][i], t.grad, atol=1e-6, rtol=1e-4)


def test_bf16_convolutions_stay_close_to_float32():
    """finetune.precision=bf16 on the generic trainer: bfloat16 convolutions, float32 elsewhere."""
    spec = get_target("cnn-33k")
    torch.manual_seed(0)
    p = FuncStack(spec, IMAGE).pack([spec.build(4, IMAGE).state_dict() for _ in range(3)], 4)
    x, y, km = torch.rand(3, 16, 1, 16, 16), torch.randint(0, 4, (3, 16)), torch.ones(3, 4, dtype=torch.bool)
    l32, g32 = FuncStack(spec, IMAGE).loss_and_grads(p, x, y, km)
    l16, g16 = FuncStack(spec, IMAGE, dtype=torch.bfloat16).loss_and_grads(p, x, y, km)
    assert g16["body.conv1.weight"].dtype == torch.float32
    torch.testing.assert_close(l16, l32, atol=2e-2, rtol=2e-2)
    for name in g32:
        cos = F.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.99, name
