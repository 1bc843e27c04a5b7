"""The generic batched trainer (zoo_builder/stack.py): every registered target trains in a group exactly
as it would alone, as an nn.Module with its own Adam."""

import pytest
import torch
import torch.nn.functional as F

from tina.targets import ImageSpec, get_target, registered
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
