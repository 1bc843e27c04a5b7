"""Sampler API, generated model folders and bundle checks, on an untrained generator."""

import json
import shutil

import pytest
import torch

from tina import Tina, load_generated
from tina.bundle import load_bundle
from tina.errors import TinaError
from tina.export import save_generated


@pytest.fixture(scope="module")
def tina(random_generator):
    return Tina.from_pretrained(random_generator)


def test_generate_returns_standalone_model(tina, tmp_path):
    model = tina.generate("classify sneakers vs sandals", seed=3)
    assert model.classes == ["sneaker", "sandal"]
    x = torch.rand(4, 1, 28, 28)
    assert model(x).shape == (4, 2)
    out = save_generated(model, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["classes"] == ["sneaker", "sandal"] and cfg["seed"] == 3 and cfg["prompt"] == "classify sneakers vs sandals"
    assert cfg["generator_fingerprint"] == tina.bundle.fingerprint
    prog = torch.export.load(str(out / "model.pt2")).module()
    for n in (1, 7):  # dynamic batch
        xb = torch.rand(n, 1, 28, 28)
        assert torch.allclose(prog(xb), model(xb), atol=1e-5)
    again = load_generated(out)
    assert again.classes == model.classes
    assert torch.allclose(again(x), model(x), atol=1e-6)


def test_seed_determinism_and_class_order(tina):
    a = tina.generate(classes=["coat", "bag", "dress"], seed=1)
    b = tina.generate(classes=["coat", "bag", "dress"], seed=1)
    c = tina.generate(classes=["coat", "bag", "dress"], seed=2)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


def test_generate_many_matches_single_calls(tina):
    """A batched call (tasks of different k, padded and masked) gives each task the weights a single call gives."""
    prompts = ["cats vs dogs", ["coat", "shirt", "bag", "sandal"], "sneakers vs sandals"]
    many = tina.generate_many(prompts, seed=4)
    single = [tina.generate(classes=p, seed=4) if isinstance(p, list) else tina.generate(p, seed=4) for p in prompts]
    assert [m.classes for m in many] == [s.classes for s in single]
    for m, s in zip(many, single):
        a, b = m.state_dict(), s.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-4, rtol=1e-3), name  # batched attention rounds differently
    assert not torch.allclose(many[0].state_dict()["head.weight"], many[2].state_dict()["head.weight"])  # and tasks differ


def test_one_step_sampling_equals_diffusers_ddim_step(tina):
    """The shipped default (1 DDIM step, x0 prediction) skips diffusers; its result is diffusers' to the bit."""
    from tina.diffusion import initial_noise, one_step_x0, sample_tokens

    b = tina.bundle
    assert one_step_x0(b.scheduler_config, "ddim", 1) and not one_step_x0(b.scheduler_config, "ddim", 2)
    cond = b.vocab_emb[:3][None].float()  # (1, 3, E)
    noise = initial_noise(0, [b.dit.num_tokens(3)], b.layout.token_size)
    for guidance in (1.0, 2.0):
        fast = sample_tokens(b.dit, b.scheduler_config, cond, sampler="ddim", steps=1, guidance=guidance, noise=noise)
        ref = sample_tokens(b.dit, b.scheduler_config, cond, sampler="ddim", steps=1, guidance=guidance, noise=noise,
                            use_scheduler=True)
        assert torch.equal(fast, ref)


def test_strength_starts_multistep_sampling_from_the_noised_mean(tina):
    """strength 0.5 with 10 DDIM steps: one call for the mean, then only the 5 timesteps at or below T/2, the
    first of them on the one-step mean noised (with the seed's own noise) to that timestep."""
    from tina.diffusion import initial_noise, make_scheduler, sample_tokens

    b = tina.bundle
    cond = b.vocab_emb[:3][None].float()  # (1, 3, E)
    noise = initial_noise(0, [b.dit.num_tokens(3)], b.layout.token_size)
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, dit):
            super().__init__()
            self.dit, self.cfg = dit, dit.cfg

        def num_tokens(self, k):
            return self.dit.num_tokens(k)

        def forward(self, x, t, *rest):
            calls.append((x.clone(), int(t[0])))
            return self.dit(x, t, *rest)

    spy = Spy(b.dit)
    mean = sample_tokens(b.dit, b.scheduler_config, cond, sampler="ddim", steps=1, noise=noise)
    sample_tokens(spy, b.scheduler_config, cond, sampler="ddim", steps=10, noise=noise, strength=0.5)
    T = b.scheduler_config["num_train_timesteps"]
    assert [t for _, t in calls] == [T - 1, 499, 399, 299, 199, 99]
    sched = make_scheduler(b.scheduler_config, "ddim")
    assert torch.allclose(calls[1][0], sched.add_noise(mean, noise, torch.tensor([499])), atol=1e-6)
    calls.clear()
    sample_tokens(spy, b.scheduler_config, cond, sampler="ddim", steps=10, noise=noise)  # strength 1: pure noise, 10 steps
    assert len(calls) == 10 and torch.equal(calls[0][0], noise)


def test_lower_strength_keeps_the_shipped_generators_samples_near_its_mean():
    """On the trained default generator: samples from half-way (strength 0.5) and a fifth of the way lie nearer
    the one-step mean model than samples from pure noise, and still differ by seed."""
    gen = Tina.from_pretrained("default")

    def flat(**kw):
        return torch.cat([p.detach().flatten() for p in gen.generate(classes=["coat", "bag", "sneaker"], **kw).parameters()])

    mean = flat()
    far = {s: [(flat(steps=10, strength=s, seed=sd) - mean).norm() for sd in (0, 1)] for s in (1.0, 0.5, 0.2)}
    assert max(far[0.2]) < min(far[0.5]) and max(far[0.5]) < min(far[1.0])
    assert not torch.equal(flat(steps=10, strength=0.5, seed=0), flat(steps=10, strength=0.5, seed=1))


def test_out_of_vocabulary_warning(tina):
    task = tina.make_task("classify spaceships vs sandals")
    assert any("spaceship" in w and "nearest" in w for w in task.warnings)
    assert not tina.make_task("classify sneakers vs sandals").warnings


@pytest.mark.parametrize("prompt,match", [("", "empty"), ("sandals", "two"), ("sandals vs sandals", "twice")])
def test_bad_prompts(tina, prompt, match):
    with pytest.raises(TinaError, match=match):
        tina.generate(prompt)


def test_too_many_classes(tina):
    with pytest.raises(TinaError, match="at most"):
        tina.generate(classes=[f"class {i}" for i in range(tina.bundle.k_max + 1)])


def test_nan_weights_are_reported(tina, monkeypatch):
    import tina.sample as s

    monkeypatch.setattr(s, "sample_tokens", lambda *a, **k: torch.full((1, tina.bundle.dit.num_tokens(2), 128), float("nan")))
    with pytest.raises(TinaError, match="NaN"):
        tina.generate("coat vs bag")


def test_bundle_checks(random_generator, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(random_generator, bad)
    meta = json.loads((bad / "bundle.json").read_text())
    meta["layout_fingerprint"] = "0" * 16
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(TinaError, match="fingerprint"):
        load_bundle(bad)
    with pytest.raises(TinaError, match="text encoder"):
        load_bundle(random_generator, text_encoder="open_clip:ViT-B-32/openai")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(random_generator, corrupt)
    (corrupt / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TinaError, match="corrupt"):
        load_bundle(corrupt)
    with pytest.raises(TinaError, match="does not exist|unknown checkpoint"):
        Tina.from_pretrained(tmp_path / "nope")


def test_shipped_default_generates_accurate_models(tmp_path, fashion_mnist):
    """The checkpoint in the repository: a real prompt gives a model that works on real images."""
    from tina.training.accuracy import accuracy, task_test_set

    ds = fashion_mnist
    t = Tina.from_pretrained("default")
    assert t.bundle.k_max >= 10 and t.bundle.projector  # image prompts ship with it
    sneaker, sandal = ds.classes.index("sneaker"), ds.classes.index("sandal")
    model = t.generate("classify sneakers vs sandals")
    x, y = task_test_set(ds, [sneaker, sandal], per_class=300)
    assert accuracy(model, x, y) > 0.9
    # any order: the reversed prompt gives the reversed outputs, just as accurate
    rev = t.generate("sandals vs sneakers")
    x2, y2 = task_test_set(ds, [sandal, sneaker], per_class=300)
    assert accuracy(rev, x2, y2) > 0.9
    # text steers the weights: swapping the meaning of the outputs must destroy accuracy
    assert accuracy(model, x, 1 - y) < 0.2


def test_pt2_export_runs_once_per_architecture(tina, tmp_path, monkeypatch):
    """The second model of an architecture reuses the first one's torch.export program with its own
    weights (no export), and the program computes that model; a template failing its sha256 is re-exported."""
    import tina.export as E

    monkeypatch.setenv("TINA_CACHE", str(tmp_path / "cache"))
    first = tina.generate("classify sneakers vs sandals", seed=1)
    save_generated(first, tmp_path / "a")
    calls = []
    real = E.export_program
    monkeypatch.setattr(E, "export_program", lambda net: calls.append(1) or real(net))
    second = tina.generate("classify coats vs bags", seed=2)
    save_generated(second, tmp_path / "b")
    assert calls == []  # the cached program, new weights
    x = torch.rand(3, 1, 28, 28)
    prog = torch.export.load(str(tmp_path / "b" / "model.pt2")).module()
    assert torch.allclose(prog(x), second(x), atol=1e-5) and not torch.allclose(prog(x), first(x), atol=1e-3)
    (template,) = (tmp_path / "cache" / "export").glob("*.pt2")
    data = template.read_bytes()
    template.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # tampered: must not be used
    save_generated(second, tmp_path / "c")
    assert calls == [1]
    assert torch.allclose(torch.export.load(str(tmp_path / "c" / "model.pt2")).module()(x), second(x), atol=1e-5)
