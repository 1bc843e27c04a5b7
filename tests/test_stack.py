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
