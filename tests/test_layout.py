"""ParamLayout: every target round-trips through flat vectors, tokens and normalisation."""

import pytest
import torch

from tina.errors import TinaError
from tina.layout import ParamLayout, layout_for
from tina.targets import ImageSpec, get_target

GRAY = ImageSpec(1, 28, (0.3,), (0.35,))
RGB = ImageSpec(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CASES = [("cnn-5k", GRAY, 128), ("cnn-5k", RGB, 64), ("cnn-33k", RGB, 128), ("resnet20+linear", GRAY, 64),
         ("resnet18+linear", RGB, 128)]


@pytest.mark.parametrize("target,image,C", CASES)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_round_trip(target, image, C, k):
    spec = get_target(target)
    net = spec.build(k, image)
    layout = ParamLayout.from_model(net, target, C, spec.is_generated)
    sd = net.state_dict()
    flat = layout.flatten(sd)
    assert flat.shape == (layout.num_params(k),)
    # flat -> state dict -> flat
    back = layout.unflatten(flat, k)
    for name, t in back.items():
        assert torch.equal(t, sd[name]), name
    # generated + frozen = the whole state dict; frozen holds buffers too (BatchNorm running statistics)
    assert set(back) | set(layout.frozen) == set(sd) and not set(back) & set(layout.frozen)
    assert all(n in layout.frozen for n, _ in net.named_buffers() if n in sd)
    # tokens: right count, padding zero, inverse exact
    tok = layout.tokenize(flat, k)
    assert tok.shape == (layout.num_tokens(k), C)
    mask = layout.token_mask(k)
    assert mask.sum() == flat.numel()
    assert torch.all(tok[~mask] == 0)
    assert torch.equal(layout.detokenize(tok, k), flat)
    # batched tokenize matches per-sample
    batch = torch.stack([flat, 2 * flat])
    assert torch.equal(layout.tokenize(batch, k)[1], layout.tokenize(2 * flat, k))


def test_tokens_never_cross_segments_and_classes_own_tokens():
    layout = layout_for("cnn-5k", GRAY, 128)
    # every body token holds numbers of exactly one segment
    starts, i = [], 0
    for s in layout.segments:
        starts.append((i, i + s.size))
        i += s.size
    for row in layout._body_index:
        real = row[row < layout.body_size]
        assert any(a <= real.min() and real.max() < b for a, b in starts)
    # class i's tokens hold exactly head row i
    k = 4
    flat = torch.arange(layout.num_params(k), dtype=torch.float32)
    tok = layout.tokenize(flat, k)
    rows = flat[layout.body_size :].reshape(k, layout.head_dim)
    m = layout.tokens_per_class
    for c in range(k):
        t = tok[layout.n_body_tokens + c * m : layout.n_body_tokens + (c + 1) * m].reshape(-1)[: layout.head_dim]
        assert torch.equal(t, rows[c])


def test_normalisation_round_trip_and_stats():
    layout = layout_for("cnn-5k", GRAY, 128)
    nets = [get_target("cnn-5k").build(k, GRAY) for k in (2, 3, 5)]
    flats = [layout.flatten(n.state_dict()) for n in nets]
    layout.fit_stats(flats)
    for f, n in zip(flats, nets):
        k = n.head.out_features
        z = layout.normalize(f, k)
        assert torch.allclose(layout.denormalize(z, k), f, atol=1e-5)
    # stats survive a save/load through plain tensors
    other = ParamLayout.from_dict(layout.to_dict())
    other.load_stats(layout.stats())
    assert torch.equal(other.normalize(flats[0], 2), layout.normalize(flats[0], 2))


def test_fingerprint_is_structural():
    a = layout_for("cnn-5k", GRAY, 128)
    assert a.fingerprint == ParamLayout.from_dict(a.to_dict()).fingerprint
    assert a.fingerprint != layout_for("cnn-5k", RGB, 128).fingerprint
    assert a.fingerprint != layout_for("cnn-5k", GRAY, 64).fingerprint


def test_wrong_length_is_a_clear_error():
    layout = layout_for("cnn-5k", GRAY, 128)
    with pytest.raises(TinaError, match="does not fit layout"):
        layout.num_classes(torch.zeros(layout.body_size + 3))


def test_unknown_target():
    with pytest.raises(TinaError, match="unknown target"):
        get_target("mlp-9000")
