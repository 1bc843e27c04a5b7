"""Adding a target is one file: a toy target registered here runs zoo -> train -> generate -> export -> reload."""

from pathlib import Path

import torch
from torch import nn

from tina.targets import ImageSpec, Target, get_target, register

ROOT = Path(__file__).parent.parent


@register
class ToyMLP(Target):
    """The whole target: a name, which parameters are generated, and the body."""

    name = "toy-mlp"
    generated = ("body.", "head.")

    def body(self, image: ImageSpec, pretrained: bool = False, checkpoint: str | None = None):
        return nn.Sequential(nn.Flatten(), nn.Linear(image.channels * image.size**2, 8), nn.ReLU()), 8


TINY = ["tasks.train=12", "tasks.unseen_combo=3", "tasks.unseen_class=0", "tasks.held_out_classes=0", "tasks.k_max=3",
        "generic.images_per_class=30", "generic.epochs=1", "finetune.steps=4", "finetune.eval_per_class=10",
        "finetune.train_per_class=50"]
TRAIN = ["generator.size=DiT-T", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=2",
         "val.tasks=2", "diffusion.steps=2", "val.images_per_class=10", "trainer.final_val_tasks=2", "optim.warmup_steps=1"]


def test_a_target_registered_in_one_file_runs_zoo_train_generate_export_reload(tmp_path):
    from tina.config import load_config
    from tina.export import load_generated, save_generated
    from tina.sample import Tina
    from tina.training.train import TrainConfig, train
    from zoo_builder.build import main as zoo_main

    assert get_target("toy-mlp").name == "toy-mlp"
    zoo = tmp_path / "zoo"
    assert zoo_main(["build", str(ROOT / "configs/zoo/tiny.yaml"), f"out={zoo}", "target=toy-mlp", *TINY]) == 0
    bundle = train(load_config(TrainConfig, ROOT / "configs/train/fashion_mnist.yaml", [f"zoo={zoo}", f"out={tmp_path / 'run'}", *TRAIN]))
    tina = Tina.from_pretrained(bundle)
    assert tina.bundle.target == "toy-mlp" and tina.bundle.layout.body_size == 28 * 28 * 8 + 8
    net = tina.generate(classes=["coat", "bag"], steps=2)
    out = save_generated(net, tmp_path / "model")
    assert __import__("json").loads((out / "config.json").read_text())["target"] == "toy-mlp"
    x = torch.rand(3, 1, 28, 28)
    back = load_generated(out)
    program = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
        torch.testing.assert_close(program(x), net(x))
    assert back.classes == ["coat", "bag"]
