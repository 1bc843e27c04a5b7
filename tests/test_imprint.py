"""Few-shot head rows (tina/imprint.py): a class given by example images gets a row from their features."""

import torch

from tina.imprint import imprint
from tina.targets import ImageSpec, get_target


def _net_and_images(k=4, n=6, seed=0):
    torch.manual_seed(seed)
    net = get_target("cnn-5k").build(k, ImageSpec(1, 28, (0.5,), (0.5,))).eval()
    # class 2's examples: bright top half; other images: noise
    x = torch.rand(n, 1, 28, 28) * 0.2
    x[:, :, :14] += 0.8
    return net, x


def test_imprinting_changes_only_the_given_class_row_on_the_generated_rows_scale():
    net, x = _net_and_images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    imprint(net, {2: x})
    after = net.state_dict()
    for k, v in before.items():
        if k.startswith("head."):
            keep = [0, 1, 3]
            assert torch.equal(after[k][keep], v[keep]), k
            assert not torch.equal(after[k][2], v[2]), k
        else:
            assert torch.equal(after[k], v), k  # the body is untouched
    radius = before["head.weight"][[0, 1, 3]].norm(dim=1).mean()
    torch.testing.assert_close(after["head.weight"][2].norm(), radius)
    # the row points along the examples' mean feature
    mean = net.features(x).mean(0)
    assert torch.nn.functional.cosine_similarity(after["head.weight"][2], mean, dim=0) > 0.999


def test_imprinted_class_wins_the_chosen_share_of_its_examples():
    for rate, low, high in ((0.5, 0.5, 0.84), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)):
        net, x = _net_and_images(n=6)
        imprint(net, {2: x}, win_rate=rate)
        wins = (net(x).argmax(-1) == 2).float().mean().item()
        assert low <= wins <= high, (rate, wins)


def test_imprinting_every_class_keeps_the_mean_bias():
    net, x = _net_and_images(k=2)
    bias = net.head.bias.mean().item()
    imprint(net, {0: x, 1: torch.rand(3, 1, 28, 28)})
    torch.testing.assert_close(net.head.bias, torch.full((2,), bias))


def test_generate_with_imprint_records_it_and_keeps_other_rows(random_generator):
    from tina.sample import Tina

    t = Tina.from_pretrained(random_generator)
    classes = t.bundle.vocab[:3]
    images = {classes[1]: torch.rand(5, t.bundle.image.channels, t.bundle.image.size, t.bundle.image.size)}
    plain = t.generate(classes=classes, seed=1)
    imprinted = t.generate(classes=classes, images=images, seed=1, imprint=True)
    assert imprinted.tina_info["imprinted"] == [classes[1]] and plain.tina_info["imprinted"] == []
    assert not torch.equal(imprinted.head.weight[1], plain.head.weight[1])


def test_cli_imprint_generates_an_unknown_class_it_would_otherwise_refuse(random_generator, tmp_path, capsys):
    """A class far from every known one is refused (exit 2); with example images and --imprint it is
    generated, its row imprinted, and config.json says so."""
    import json

    from tina.cli import main
    from test_cli import write_png

    pngs = [str(write_png(tmp_path / f"zebra{i}.png", value=120 + 20 * i)) for i in range(3)]
    base = ["generate", "--classes", "coat", "zebra crossing", "--checkpoint", str(random_generator)]
    assert main([*base, "-o", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()
    images = [a for p in pngs for a in ("--image", f"zebra crossing={p}")]
    out = tmp_path / "m"
    assert main([*base, *images, "--imprint", "-o", str(out)]) == 0
    info = json.loads((out / "config.json").read_text())
    assert info["imprinted"] == ["zebra crossing"] and info["allowed_unknown"] is False
    assert main(["generate", "--classes", "coat", "bag", "--imprint", "--checkpoint", str(random_generator),
                 "-o", str(tmp_path / "x")]) == 2
