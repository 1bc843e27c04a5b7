"""The paper's second setting end to end through the CLI: a backbone trained once as the generic model
(offline: no pretrained weights), frozen with its BatchNorm statistics, and personalized heads;
`tina train` with validation on, `tina generate`, `tina eval`, `tina predict` and torch.export.load."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).parent.parent
ZOO = ["tasks.train=12", "tasks.unseen_combo=3", "tasks.unseen_class=0", "tasks.held_out_classes=0", "tasks.k_max=3",
       "generic.images_per_class=40", "generic.epochs=1", "finetune.steps=5", "finetune.eval_per_class=10",
       "finetune.train_per_class=50"]
TRAIN = ["generator.size=DiT-T", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.val_every=1", "trainer.ckpt_every=2",
         "val.tasks=2", "diffusion.steps=2", "val.images_per_class=10", "trainer.final_val_tasks=2", "optim.warmup_steps=1"]


def _trained_resnet20(k=3):
    from tina.targets import ImageSpec, get_target

    torch.manual_seed(0)
    net = get_target("resnet20+linear").build(k, ImageSpec(1, 28, (0.3,), (0.35,)))
    net.train()
    net(torch.rand(16, 1, 28, 28))  # moves the BatchNorm running statistics off their init
    net.eval().classes = [f"c{i}" for i in range(k)]
    return net


def test_generated_folder_stores_the_backbone_once_and_reloads_it_with_batchnorm_statistics(tmp_path):
    from tina.errors import TinaError
    from tina.export import load_generated, save_generated

    net = _trained_resnet20()
    out = save_generated(net, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["target"] == "resnet20+linear" and cfg["frozen"] == {"in": "model.pt2"}
    from safetensors.torch import load_file

    assert set(load_file(out / "model.safetensors")) == {"head.weight", "head.bias"}  # the backbone lives in model.pt2 only
    back = load_generated(out)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
        torch.testing.assert_close(torch.export.load(out / "model.pt2").module()(x), net(x))
    for a, b in zip(back.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)  # running_mean / running_var / num_batches_tracked included

    shared = tmp_path / "backbone.safetensors"
    for name in ("a", "b"):  # two heads, one backbone file
        save_generated(net, tmp_path / name, backbone=shared)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(load_generated(tmp_path / "b")(x), net(x), rtol=0, atol=0)
    other = _trained_resnet20()
    other.body.stem[0].weight.data += 1
    with pytest.raises(TinaError, match="not this model's backbone"):
        save_generated(other, tmp_path / "c", backbone=shared)  # never overwritten
    shared.write_bytes(shared.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TinaError, match="sha256"):
        load_generated(tmp_path / "a")


def tina(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "tina.cli", *map(str, args)], capture_output=True, text=True, timeout=1800, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("target", ["resnet20+linear", "resnet18+linear"])
def test_head_on_a_batchnorm_backbone_end_to_end(target, tmp_path):
    zoo, run, out = tmp_path / "zoo", tmp_path / "run", tmp_path / "model"
    tina("zoo", "build", ROOT / "configs/zoo/tiny.yaml", f"out={zoo}", f"target={target}", *ZOO)
    man = json.loads((zoo / "manifest.json").read_text())
    assert any("running_mean" in n for n in man["layout"]["frozen"])  # BatchNorm statistics are part of the frozen base
    tina("train", ROOT / "configs/train/fashion_mnist.yaml", f"zoo={zoo}", f"out={run}", *TRAIN)  # validates at every step
    assert (run / "logs").is_dir()
    text = tina("generate", "--checkpoint", run / "bundle", "--classes", "coat", "bag", "-o", out, "--steps", "2")
    assert str(out) in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["target"] == target and cfg["frozen"] == {"in": "model.pt2"}  # the backbone is stored once, in model.pt2
    assert (out / "model.safetensors").stat().st_size < 100_000  # the head only
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype("uint8")).save(img)
    assert "x.png:" in tina("predict", out, img)
    program = torch.export.load(out / "model.pt2").module()
    assert program(torch.rand(2, 1, 28, 28)).shape == (2, 2)
    tina("eval", ROOT / "configs/eval/fashion_mnist.yaml", "--checkpoint", run / "bundle", "--zoo", zoo, "--out", tmp_path / "eval",
         "--tasks", 2, "--seeds", 1, "--steps", 2, "splits=[unseen_combo]", "image_shots=[]", "finetune.tasks=0",
         "images_per_class=10", "plots=false", "bootstrap=10", "novelty.tasks=0", "diversity.tasks=0", "baselines=[oracle,selection]")
    shared = tmp_path / "backbone.safetensors"
    for name in ("a", "b"):
        tina("generate", "--checkpoint", run / "bundle", "--classes", "coat", "bag", "-o", tmp_path / name, "--steps", "2",
             "--backbone", shared)
        assert not (tmp_path / name / "model.pt2").exists()
    assert "x.png:" in tina("predict", tmp_path / "b", img)
