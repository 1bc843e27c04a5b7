"""Diffusion over parameter tokens with diffusers schedulers: training loss, sampling, guidance.

Training uses DDPMScheduler.add_noise; sampling swaps in DDIM or DPM-Solver built from the same
config (`from_config`), so one trained generator serves every sampler. The image defaults of
diffusers are wrong here and set explicitly: no sample clipping (weights are not in [-1, 1]),
trailing timestep spacing (few-step samplers start from pure noise), x0 prediction by default as
in the paper (eps and v available). A scheduler holds state, so every request builds a fresh one.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tina.errors import TinaError
from tina.validate import check_sampling

PREDICTION_TYPES = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}
SAMPLERS = ("ddim", "dpm", "ddpm")


@dataclass
class DiffusionConfig:
    """Noise schedule, prediction target and sampling defaults."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "x0"  # x0 (paper), eps or v
    cond_dropout: float = 0.1  # probability of training with the null text (classifier-free guidance)
    sampler: str = "ddim"  # default sampler: ddim, dpm or ddpm
    steps: int = 25  # default sampling steps
    guidance: float = 1.0  # default guidance scale; 1 = plain conditional sampling
    # Share of each training batch drawn from the noisiest 5% of timesteps. There the x0 prediction can
    # only come from the text: it is the conditional mean E[weights | classes] that one-step sampling
    # returns, and uniform timesteps give it a tenth of the training signal.
    high_noise_fraction: float = 0.0

    def __post_init__(self):
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {list(PREDICTION_TYPES)}, got {self.prediction!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0.0 <= self.high_noise_fraction <= 1.0:
            raise ValueError(f"high_noise_fraction must be in [0, 1], got {self.high_noise_fraction}")


@dataclass(frozen=True)
class SamplingSettings:
    """Checked generation settings, the checkpoint's defaults filled in."""

    seed: int
    steps: int
    guidance: float
    sampler: str
    strength: float = 1.0  # multi-step sampling starts at this fraction of the noise schedule (sample_tokens)


def resolve_sampling(defaults: dict, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                     sampler: str | None = None, strength: float | None = None) -> SamplingSettings:
    """The one place generation settings are checked: the library (Tina.generate_tasks), the CLI (its flags
    reach the library unchanged; check_args runs the same range checks before any loading) and the demo.

    None takes the checkpoint's default (`defaults`: bundle.json "sampling"); then every value is checked,
    defaults included (a hand-edited bundle.json is input too). TinaError names the setting."""
    check_sampling(seed, steps, guidance, strength)
    steps = defaults.get("steps", 25) if steps is None else steps
    guidance = defaults.get("guidance", 1.0) if guidance is None else guidance
    strength = defaults.get("strength", 1.0) if strength is None else strength
    sampler = sampler or defaults.get("sampler", "ddim")
    if sampler not in SAMPLERS:
        raise TinaError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    check_sampling(seed, steps, guidance, strength)
    return SamplingSettings(seed, steps, float(guidance), sampler, float(strength))


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """The DDPM training scheduler's config (saved in bundles as scheduler_config.json)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=PREDICTION_TYPES[cfg.prediction],
        clip_sample=False,
        timestep_spacing="trailing",
    ).config)


def _from_config(cls, config: dict, **overrides):
    """cls(**config) keeping the keys cls takes. diffusers' own `from_config` first imports every
    "compatible" scheduler class (scipy among them), which costs most of a second per cold start."""
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in {**config, **overrides}.items() if k in params})


def make_scheduler(config: dict, sampler: str = "ddpm"):
    """A fresh scheduler of the given kind from a saved DDPM config.

    Each class is imported when asked for: the DPM-Solver module pulls in scipy, which would add
    most of a second to every cold `tina generate` that samples with DDIM.
    """
    if sampler == "ddpm":
        from diffusers import DDPMScheduler

        return _from_config(DDPMScheduler, config)
    if sampler == "ddim":
        from diffusers import DDIMScheduler

        return _from_config(DDIMScheduler, config, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if sampler == "dpm":
        from diffusers import DPMSolverMultistepScheduler

        return _from_config(
            DPMSolverMultistepScheduler, config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero"
        )
    raise TinaError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")


def high_noise_start(num_train_timesteps: int, share: float = 0.05) -> int:
    """First timestep of the noisiest `share` of the schedule (at least the last timestep). 0.05 is where
    high_noise_fraction draws from; the task loss scores rows from high_noise_start(T, 1 - task_loss.min_t)."""
    return num_train_timesteps - max(1, math.floor(share * num_train_timesteps + 1e-9))  # + 1e-9: 0.05 x T in floats


class DiffusionLoss(NamedTuple):
    """One training step's loss and what it was computed from (the task loss scores `pred`)."""

    loss: torch.Tensor  # () masked MSE
    pred: torch.Tensor  # (N, T, C) the model's prediction (x0, eps or v, as configured)
    t: torch.Tensor  # (N,) timesteps
    uncond: torch.Tensor  # (N,) True where the condition was dropped


def training_loss(model, scheduler, x0, elem_mask, cond, cond_mask, cond_dropout: float,
                  high_noise_fraction: float = 0.0) -> DiffusionLoss:
    """Masked MSE of the model's prediction at a random timestep (see DiffusionConfig.high_noise_fraction).

    x0 (N, T, C) normalised tokens; elem_mask (N, T, C) True on real parameters; cond (N, K, E).
    """
    N = x0.shape[0]
    T = scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (N,), device=x0.device)
    if high_noise_fraction > 0:
        high = torch.rand(N, device=x0.device) < high_noise_fraction
        t = torch.where(high, torch.randint(high_noise_start(T), T, (N,), device=x0.device), t)
    noise = torch.randn_like(x0)
    xt = scheduler.add_noise(x0, noise, t)
    uncond = torch.rand(N, device=x0.device) < cond_dropout
    pred = model(xt, t, cond, cond_mask, uncond)  # (N, T, C)
    kind = scheduler.config.prediction_type
    target = {"sample": x0, "epsilon": noise}.get(kind)
    if target is None:
        target = scheduler.get_velocity(x0, noise, t)
    w = elem_mask.to(pred.dtype)
    return DiffusionLoss(((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1), pred, t, uncond)


def initial_noise(seed: int, num_tokens: list[int], token_size: int) -> torch.Tensor:
    """(N, max T, C) starting noise for N tasks: task i's first num_tokens[i] rows come from its own
    generator seeded `seed` (zeros after them: padding the mask hides), so a task's sample does not
    depend on the tasks it is batched with (generate_many equals single calls; validation equals generate)."""
    out = torch.zeros(len(num_tokens), max(num_tokens), token_size)
    for i, n in enumerate(num_tokens):
        out[i, :n] = torch.randn(n, token_size, generator=torch.Generator().manual_seed(seed))
    return out


def one_step_x0(config: dict, sampler: str, steps: int) -> bool:
    """Whether sampling is one DDIM step of an x0-predicting generator (the shipped checkpoints' default).

    Then the answer is the model's own prediction at t = T-1 from pure noise: with trailing spacing the
    one timestep is T-1, DDIM's scale_model_input and init_noise_sigma are identities, and with
    set_alpha_to_one the step returns sqrt(1) * x0 + 0 * eps = x0. No scheduler is needed, so no
    diffusers import (whose first import pulls in torch._dynamo, ~2 s of every cold `tina generate`).
    tests/test_generate.py checks the result equals diffusers' DDIM step to the bit."""
    return sampler == "ddim" and steps == 1 and config.get("prediction_type") == "sample"


def _predict(model, x_in, tt, cond, cond_mask, guidance: float) -> torch.Tensor:
    """The model's prediction (N, T, C), with classifier-free guidance when guidance != 1."""
    if guidance == 1.0:
        return model(x_in, tt, cond, cond_mask)
    N = x_in.shape[0]
    both = model(  # one batched call for conditional and null-text predictions
        torch.cat([x_in, x_in]),
        torch.cat([tt, tt]),
        torch.cat([cond, cond]),
        None if cond_mask is None else torch.cat([cond_mask, cond_mask]),
        torch.cat([torch.zeros(N, dtype=torch.bool), torch.ones(N, dtype=torch.bool)]).to(cond.device),
    )
    c, u = both.chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def sample_tokens(
    model,
    config: dict,
    cond: torch.Tensor,  # (N, K, E)
    cond_mask: torch.Tensor | None = None,  # (N, K)
    *,
    sampler: str = "ddim",
    steps: int = 25,
    guidance: float = 1.0,
    noise: torch.Tensor | None = None,  # (N, T, C); drawn from `generator` when None
    generator: torch.Generator | None = None,
    use_scheduler: bool = False,  # run diffusers' scheduler even where one_step_x0 makes it unnecessary (tests)
    strength: float = 1.0,
) -> torch.Tensor:
    """Run the reverse process; returns normalised x0 tokens (N, T, C).

    strength < 1 (with steps > 1): start from the one-step conditional mean, noised back to timestep
    strength x T, and run only the sampler's timesteps from there (SDEdit, Meng et al. 2022). From pure
    noise the generators' low-noise steps, which high-noise training leaves weak, carry the whole sample
    away from the mean (-1.6 points at 25 steps on Fashion-MNIST val); from 0.3 of the way (that
    checkpoint's default) they stay within 1 point of it and still differ from one another (README, Diversity)."""
    if steps < 1:
        raise TinaError(f"--steps must be at least 1, got {steps}")
    N, K, _ = cond.shape
    shape = (N, model.num_tokens(K), model.cfg.token_size)
    x = noise if noise is not None else torch.randn(shape, generator=generator, device=cond.device)
    if one_step_x0(config, sampler, steps) and not use_scheduler:
        t = torch.full((N,), config["num_train_timesteps"] - 1, dtype=torch.long, device=cond.device)  # (N,) = T-1
        return _predict(model, x, t, cond, cond_mask, guidance)  # (N, T, C) the x0 prediction
    sched = make_scheduler(config, sampler)
    sched.set_timesteps(steps, device=cond.device)
    timesteps = sched.timesteps
    if strength < 1 and steps > 1:
        # The mean from the same seeded noise (one DDIM step returns the x0 estimate for any prediction type).
        mean = sample_tokens(model, config, cond, cond_mask, sampler="ddim", steps=1, guidance=guidance, noise=x)
        begin = min(int((timesteps > strength * config["num_train_timesteps"]).sum()), len(timesteps) - 1)
        timesteps = timesteps[begin:]
        if hasattr(sched, "set_begin_index"):  # multistep solvers index their state from here
            sched.set_begin_index(begin)
        x = sched.add_noise(mean, x, timesteps[:1])
    else:
        x = x * sched.init_noise_sigma
    for t in timesteps:
        x_in = sched.scale_model_input(x, t)
        pred = _predict(model, x_in, t.expand(N).to(cond.device), cond, cond_mask, guidance)
        x = sched.step(pred, t, x, generator=generator).prev_sample if sampler == "ddpm" else sched.step(pred, t, x).prev_sample
    return x
