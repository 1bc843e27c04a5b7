"""The DiT: class-order equivariance, any number of classes, padding, guidance, overfitting."""

import pytest
import torch

from tina.diffusion import DiffusionConfig, make_scheduler, sample_tokens, scheduler_config, training_loss
from tina.model import DIT_SIZES, DiT, DiTConfig, build_dit

TB, M, C, E = 5, 2, 16, 12


def tiny(seed=0, perturb=True):
    torch.manual_seed(seed)
    dit = DiT(DiTConfig(token_size=C, n_body_tokens=TB, tokens_per_class=M, cond_dim=E, width=32, depth=2, heads=4))
    if perturb:  # adaLN-Zero starts at zero output; give it nontrivial weights
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


def permute_tokens(x, perm):
    K = len(perm)
    head = x[:, TB:].reshape(x.shape[0], K, M, -1)[:, perm]
    return torch.cat([x[:, :TB], head.reshape(x.shape[0], K * M, -1)], 1)


def test_equivariant_to_class_order():
    dit = tiny()
    K = 5
    x, t, cond = torch.randn(3, TB + K * M, C), torch.tensor([3, 300, 900]), torch.randn(3, K, E)
    perm = torch.tensor([2, 4, 0, 1, 3])
    y = dit(x, t, cond)
    yp = dit(permute_tokens(x, perm), t, cond[:, perm])
    assert torch.allclose(permute_tokens(y, perm), yp, atol=1e-5)
    # and it is not trivially invariant: different classes get different outputs
    assert (y[:, TB:TB + M] - y[:, TB + M:TB + 2 * M]).abs().max() > 1e-3


def test_sampling_equivariant_given_permuted_noise():
    dit = tiny()
    sc = scheduler_config(DiffusionConfig())
    K = 4
    cond, noise = torch.randn(1, K, E), torch.randn(1, TB + K * M, C)
    perm = torch.tensor([3, 1, 0, 2])
    a = sample_tokens(dit, sc, cond, noise=noise, steps=5, guidance=2.0)
    b = sample_tokens(dit, sc, cond[:, perm], noise=permute_tokens(noise, perm), steps=5, guidance=2.0)
    assert torch.allclose(permute_tokens(a, perm), b, atol=1e-4)


def test_padding_matches_unpadded_and_any_k():
    dit = tiny()
    for K in (1, 2, 7, 31):
        x, cond = torch.randn(2, TB + K * M, C), torch.randn(2, K, E)
        assert dit(x, torch.tensor([1, 2]), cond).shape == x.shape
    K, pad = 3, 4
    x, cond = torch.randn(1, TB + (K + pad) * M, C), torch.randn(1, K + pad, E)
    mask = torch.tensor([[True] * K + [False] * pad])
    full = dit(x, torch.tensor([50]), cond, mask)
    alone = dit(x[:, : TB + K * M], torch.tensor([50]), cond[:, :K])
    assert torch.allclose(full[:, : TB + K * M], alone, atol=1e-5)


def test_null_condition_ignores_text():
    dit = tiny()
    x, t = torch.randn(2, TB + 3 * M, C), torch.tensor([10, 10])
    u = torch.ones(2, dtype=torch.bool)
    a = dit(x, t, torch.randn(2, 3, E), uncond=u)
    b = dit(x, t, torch.randn(2, 3, E), uncond=u)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(dit(x, t, torch.randn(2, 3, E)), a, atol=1e-3)


def test_overfits_a_few_vectors_and_samples_them_back():
    """Two conditions → two parameter vectors; after training the sampler returns each one."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig(token_size=C, n_body_tokens=TB, tokens_per_class=M, cond_dim=E, width=64, depth=2, heads=4))
    cfg = DiffusionConfig(cond_dropout=0.0)
    sc = scheduler_config(cfg)
    ddpm = make_scheduler(sc, "ddpm")
    K = 2
    x0 = torch.randn(2, TB + K * M, C)
    cond = torch.nn.functional.normalize(torch.randn(2, K, E), dim=-1)
    mask = torch.ones_like(x0, dtype=torch.bool)
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3)
    for _ in range(600):
        loss = training_loss(dit, ddpm, x0, mask, cond, None, 0.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dit.eval()
    out = sample_tokens(dit, sc, cond, steps=20, generator=torch.Generator().manual_seed(1))
    err = (out - x0).pow(2).mean() / x0.pow(2).mean()
    swapped = (out - x0.flip(0)).pow(2).mean() / x0.pow(2).mean()
    assert err < 0.05, err
    assert swapped > 0.5  # each condition gets its own vector


def test_size_registry():
    for name in DIT_SIZES:
        dit = build_dit(name, token_size=8, n_body_tokens=2, tokens_per_class=1, cond_dim=4)
        assert dit.cfg.width == DIT_SIZES[name]["width"]


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_high_noise_fraction_draws_that_share_of_timesteps_from_the_top(fraction):
    """DiffusionConfig.high_noise_fraction: that share of a batch trains at the noisiest 5% of timesteps."""
    seen = []

    def model(xt, t, cond, cond_mask, uncond):
        seen.append(t)
        return xt

    ddpm = make_scheduler(scheduler_config(DiffusionConfig()), "ddpm")
    x0 = torch.randn(4000, 2, 3)
    torch.manual_seed(0)
    training_loss(model, ddpm, x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros(4000, 1, 4), None, 0.0, fraction)
    top = (seen[0] >= 950).float().mean().item()
    expect = fraction + (1 - fraction) * 0.05
    assert abs(top - expect) < 0.03
    assert seen[0].min() >= 0 and seen[0].max() < 1000
