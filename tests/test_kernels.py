"""zoo_builder.kernels: the fused C kernels equal their torch twins, build once, and fall back cleanly."""

from __future__ import annotations

import logging

import pytest
import torch

from zoo_builder import fit, kernels
from zoo_builder.kernels import CKernels, TorchKernels

C_LIB = kernels.load()
needs_c = pytest.mark.skipif(C_LIB is None, reason="no C compiler: the torch twins are tested elsewhere")
DTYPES = [torch.float32, torch.bfloat16]


def _ties(t: torch.Tensor) -> torch.Tensor:
    """Round to a coarse grid so that windows hold exact ties (max_pool2d's first-maximum rule matters)."""
    return (t * 2).round() / 2


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [14, 7])  # odd: the last row/column is in no window and gets zero gradient
def test_pool_relu_and_backward_equal_torch(dtype, size):
    z = _ties(torch.randn(3, size, size, 24)).to(dtype)
    a_c, s_c = C_LIB.pool_relu(z)
    a_t, s_t = TorchKernels.pool_relu(z)
    assert torch.equal(a_c, a_t)
    da = torch.randn(a_t.shape).to(dtype)
    (dz_c, db_c), (dz_t, db_t) = C_LIB.pool_relu_backward(da, s_c), TorchKernels.pool_relu_backward(da, s_t)
    assert torch.equal(dz_c, dz_t)
    assert dz_c.shape == z.shape and (dz_c != 0).sum() <= a_c.numel()
    torch.testing.assert_close(db_c, dz_t.float().sum((0, 1, 2)), atol=1e-4, rtol=1e-5)  # the conv's bias gradient
    torch.testing.assert_close(db_t, db_c, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_batch_normalises_like_fit_data(channels):
    images = torch.randint(0, 256, (50, 12, 12, channels), dtype=torch.uint8)
    rows = torch.tensor([[4, 0, 49], [4, 17, 3]])
    mean, std = torch.rand(channels), torch.rand(channels) + 0.2
    x = kernels.ImageBatch.from_pool(images, rows, mean, std, torch.float32)
    assert x.shape == (2, 3, 12, 12, channels) and x[1:].shape == (1, 3, 12, 12, channels)
    ref = images[rows].float().div_(255.0).sub_(mean).div_(std)  # FitData.inputs
    assert torch.equal(x.normalised(), ref)
    b16 = kernels.ImageBatch.from_pool(images, rows, mean, std, torch.bfloat16).normalised()
    assert torch.equal(b16, ref.to(torch.bfloat16).float())  # rounded to the compute dtype


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,size", [(1, 12), (3, 8), (1, 10)])
def test_conv1_forward_and_weight_gradient_equal_torch(dtype, channels, size):
    """From the uint8 pool and from normalised images: the same pooled activations, and the same w1/b1
    gradients up to summation order (bf16: the C kernel does not round the pre-pool outputs)."""
    G, B = 3, 5
    images = (torch.randint(0, 4, (40, size, size, channels)) * 60).to(torch.uint8)  # few levels: exact ties
    rows = torch.randint(0, 40, (G, B))
    mean, std = torch.full((channels,), 0.3), torch.full((channels,), 0.35)
    w1, b1 = torch.randn(G, 3, 3, channels, 8), torch.randn(G, 8) * 0.1
    x = kernels.ImageBatch.from_pool(images, rows, mean, std, dtype)
    xn = kernels.ImageBatch.from_normalised(x.normalised(), dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    a_t, s_t = TorchKernels.conv1(x, w1, b1, dtype)
    da = torch.randn(a_t.shape).to(dtype)
    gw_t, gb_t = TorchKernels.conv1_backward(da, s_t)
    for batch in (x, xn):
        a_c, s_c = C_LIB.conv1(batch, w1, b1, dtype)
        assert a_c.shape == (B * (size // 2) ** 2, G, 8) and a_c.dtype == dtype
        torch.testing.assert_close(a_c.float(), a_t.float(), **tol)
        gw_c, gb_c = C_LIB.conv1_backward(da, s_c)
        assert gw_c.shape == (G, 3, 3, channels, 8) and gw_c.dtype == torch.float32
        if dtype == torch.float32:
            torch.testing.assert_close(gw_c, gw_t, **tol)
            torch.testing.assert_close(gb_c, gb_t, **tol)
        else:  # near-ties may pick another window position than the bf16-rounded matmul: compare overall
            for got, ref in ((gw_c, gw_t), (gb_c, gb_t)):
                assert ((got - ref).norm() / ref.norm()).item() < 0.1


@needs_c
@pytest.mark.parametrize("width", [14, 16, 8, 10])  # register blocks of 7, 8 and 4 pixels, and single pixels
def test_conv_input_gradient_equals_onednn(width):
    G, B, ci, co = 3, 2, 8, 16
    a = torch.randn(B, width, width, G * ci).permute(0, 3, 1, 2)
    w = torch.randn(G, 9 * ci, co)
    k = w.view(G, 3, 3, ci, co).permute(0, 4, 3, 1, 2).reshape(G * co, ci, 3, 3).contiguous(memory_format=torch.channels_last)
    dz = torch.randn(B, width, width, G * co).permute(0, 3, 1, 2)
    da_c, dk_c = C_LIB.conv_backward(dz, a, k, w, G)
    da_t, dk_t = TorchKernels.conv_backward(dz, a, k, w, G)
    torch.testing.assert_close(da_c, da_t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dk_c, dk_t)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_loss_and_gradients_equal_torch(dtype):
    """Models with different k (padded classes get no gradient), read from and written to the grouped layout."""
    G, B, c3, K = 3, 7, 16, 5
    a3 = torch.relu(torch.randn(B, 3, 3, G * c3)).to(dtype)
    wh, bh = torch.randn(G, c3 * 9, K) * 0.1, torch.randn(G, K)
    kmask = torch.arange(K)[None] < torch.tensor([[2], [5], [3]])
    y = torch.stack([torch.randint(0, int(k), (B,)) for k in kmask.sum(1)])
    loss_c, g_c, da_c = C_LIB.head(a3, wh, bh, y, kmask)
    loss_t, g_t, da_t = TorchKernels.head(a3, wh, bh, y, kmask)
    torch.testing.assert_close(loss_c, loss_t, atol=1e-5, rtol=1e-5)
    for n in ("wh", "bh"):
        torch.testing.assert_close(g_c[n], g_t[n], atol=1e-5, rtol=1e-4)
    assert (g_c["bh"][0, 2:] == 0).all() and (g_c["wh"][0, :, 2:] == 0).all()
    assert da_c.dtype == dtype and da_c.shape == a3.shape
    torch.testing.assert_close(da_c.float(), da_t.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def _batch(G=4, B=16, seed=0):
    from tina.targets import ImageSpec, get_target

    torch.manual_seed(seed)
    image = ImageSpec(1, 28, (0.3,), (0.35,))
    nets = [get_target("cnn-5k").build(5, image) for _ in range(G)]
    images = torch.randint(0, 256, (300, 28, 28, 1), dtype=torch.uint8)
    labels = torch.arange(300) % 5
    order, start, count = fit.class_index(labels, 5, 0, torch.Generator().manual_seed(0))
    data = fit.FitData(images, order, start, count, images, order, start, count, torch.tensor([0.3]),
                       torch.tensor([0.35]), torch.zeros(300, 144))  # fmt: skip
    tasks = [[0, 1, 2, 3, 4]] * G
    ids, ks, kmask = fit.class_tables(tasks, 5)
    idx, y = fit.sample_batch(data, ids, ks, B, fit.model_keys(seed, range(G)), 0)
    return [n.state_dict() for n in nets], data, idx, y, kmask


@needs_c
def test_training_step_with_c_kernels_matches_torch_kernels_and_bmm():
    """One loss_and_grads through every backend, from the uint8 pool (Windows) and from normalised images."""
    sds, data, idx, y, kmask = _batch()
    ref_net = fit.StackedCNN5k(1, 28, conv_impl="bmm")
    p = ref_net.pack(sds, 5)
    loss0, g0 = ref_net.loss_and_grads(p, data.inputs(data.train, idx), y, kmask)
    for choice in ("c", "torch"):
        net = fit.StackedCNN5k(1, 28, conv_impl="grouped", kernels=choice)
        x = net.train_inputs(data, idx)
        assert isinstance(x, kernels.ImageBatch)
        for inputs in (x, data.inputs(data.train, idx)):
            loss, g = net.loss_and_grads(p, inputs, y, kmask)
            torch.testing.assert_close(loss, loss0, atol=1e-5, rtol=1e-5)
            for n in g0:
                torch.testing.assert_close(g[n], g0[n], atol=1e-5, rtol=1e-4, msg=f"{choice} {n}")
        # evaluation's forward (float32 windows of the eval pool) gives the same logits as the bmm path's
        logits = net.logits(p, net.inputs(data, data.eval, idx))
        torch.testing.assert_close(logits, ref_net.logits(p, data.inputs(data.eval, idx)), atol=1e-5, rtol=1e-5)


@needs_c
def test_bf16_c_kernels_are_as_accurate_as_the_torch_path():
    """In bfloat16 the C conv1 accumulates in float32 without rounding its pre-pool outputs, so it may
    differ from the torch twin, but never by more than bf16 training itself differs from float32."""
    sds, data, idx, y, kmask = _batch(G=6, B=32)
    p = fit.StackedCNN5k(1, 28).pack(sds, 5)
    _, g32 = fit.StackedCNN5k(1, 28, kernels="torch").loss_and_grads(p, data.inputs(data.train, idx), y, kmask)

    def err(choice):
        net = fit.StackedCNN5k(1, 28, torch.bfloat16, kernels=choice)
        _, g = net.loss_and_grads(p, net.train_inputs(data, idx), y, kmask)
        return {n: ((g[n] - g32[n]).norm() / g32[n].norm()).item() for n in g32}

    e_c, e_t = err("c"), err("torch")
    for n in e_c:
        assert e_c[n] < 0.2 and e_c[n] < 1.5 * e_t[n] + 0.01, (n, e_c[n], e_t[n])


def test_backend_choice_and_fallbacks(monkeypatch):
    from tina.errors import TinaError

    assert kernels.backend(torch.device("cpu"), "torch") is TorchKernels
    with pytest.raises(ValueError, match="auto, c or torch"):
        kernels.backend(torch.device("cpu"), "fast")
    with pytest.raises(TinaError, match="on a CPU"):
        kernels.backend(torch.device("cuda"), "c")
    monkeypatch.setenv("TINA_KERNELS", "0")
    assert kernels.backend(torch.device("cpu")) is TorchKernels
    with pytest.raises(TinaError, match="unavailable"):
        kernels.backend(torch.device("cpu"), "c")


@needs_c
def test_c_kernels_fall_back_for_other_dtypes():
    z = torch.randn(2, 6, 6, 4, dtype=torch.float64)
    a, s = C_LIB.pool_relu(z)
    torch.testing.assert_close(a, TorchKernels.pool_relu(z)[0])
    assert C_LIB.pool_relu_backward(torch.ones_like(a), s)[0].dtype == torch.float64


def test_library_is_built_once_atomically_and_a_missing_compiler_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(kernels.library, "_loaded", {})
    monkeypatch.setenv("TINA_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="zoo_builder.kernels"):
        assert kernels.load() is None
    assert "could not build the CPU kernels" in caplog.text
    assert kernels.backend(torch.device("cpu")) is TorchKernels  # training still runs
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind
    if C_LIB is None:
        return
    monkeypatch.setattr(kernels.library, "_loaded", {})
    monkeypatch.delenv("CC")
    lib = kernels.load()
    assert isinstance(lib, CKernels)
    (built,) = (tmp_path / "cache").glob("kernels-*.so")
    mtime = built.stat().st_mtime_ns
    monkeypatch.setattr(kernels.library, "_loaded", {})
    assert isinstance(kernels.load(), CKernels) and built.stat().st_mtime_ns == mtime  # reused, not rebuilt
