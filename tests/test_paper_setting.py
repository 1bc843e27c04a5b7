"""The paper setting through checkpoints.md's commands, on tiny stand-in files written here.

CIFAR-100 goes where the configs look by default (~/.cache/tina/cifar, HOME pointed at a temporary
folder) and the CLIP checkpoint where configs/zoo/cifar100_paper.yaml names it. ViT-B/32 (151M
parameters) is too large for the default suite, so the checkpoint is a random-weight open_clip
model of a 1-layer architecture registered with open_clip here; the commands otherwise differ from
the documented ones only by size overrides (and that architecture's name).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from tina.cli import main as cli
from tina.errors import TinaError

CONFIGS = Path(__file__).parent.parent / "configs"
TINY_ARCH = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
ARCH = "TinaTinyCLIP-quickgelu"  # QuickGELU, like OpenAI's ViT-B-32-quickgelu
CKPT = "~/.cache/tina/open_clip/tiny-openai/open_clip_pytorch_model.bin"
REDUCED_ZOO = ["tasks.train=8", "tasks.val=2", "tasks.unseen_combo=2", "tasks.unseen_class=2", "tasks.held_out_classes=1",
               "generic.epochs=2", "finetune.steps=5", "shard_size=20", "runtime.threads=1"]  # fmt: skip
REDUCED_TRAIN = ["generator.size=DiT-T", "trainer.max_steps=3", "trainer.batch_size=4", "trainer.workers=0",
                 "trainer.val_every=1000", "trainer.ckpt_every=1000", "val.tasks=2", "trainer.final_val_tasks=2",
                 "optim.warmup_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A HOME holding stand-in CIFAR-100 and the tiny checkpoint at the documented places."""
    import open_clip

    from tina.training.testing import write_random_open_clip, write_stand_in_cifar100

    home = tmp_path_factory.mktemp("home")
    for name, quick in ((ARCH, True), ("TinaTinyCLIP", False)):
        (home / f"{name}.json").write_text(json.dumps({**TINY_ARCH, "quick_gelu": quick}))
        open_clip.add_model_config(home / f"{name}.json")  # a test-only name; open_clip's registry is global
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    for var in ("TINA_CIFAR", "TINA_CACHE"):
        mp.delenv(var, raising=False)
    write_stand_in_cifar100(home / ".cache" / "tina" / "cifar")
    write_random_open_clip(Path(CKPT).expanduser(), ARCH)
    yield home
    mp.undo()


def test_paper_chain_on_stand_in_files(home, tmp_path, capsys):
    """zoo build -> train -> generate -> eval with the paper's configs, verify=false for stand-in data."""
    enc = f"text_encoder=open_clip:{ARCH}/{CKPT}"
    zoo, run, model, out = tmp_path / "zoo", tmp_path / "run", tmp_path / "model", tmp_path / "eval"
    assert cli(["zoo", "build", str(CONFIGS / "zoo" / "cifar100_paper.yaml"), enc, "dataset.verify=false",
                f"out={zoo}", *REDUCED_ZOO]) == 0  # fmt: skip
    man = json.loads((zoo / "manifest.json").read_text())
    assert man["dataset"]["verify"] is False and man["dataset"]["root"] is None and man["counts"]["val"] == 2
    assert cli(["train", str(CONFIGS / "train" / "cifar100_paper.yaml"), f"zoo={zoo}", f"out={run}", *REDUCED_TRAIN]) == 0
    assert capsys.readouterr().out.count("generator bundle:") == 1
    assert cli(["generate", "--checkpoint", str(run / "bundle"), "apple vs bear vs bee", "-o", str(model)]) == 0
    # Flags first, then overrides; the zoo's dataset record and local CLIP checkpoint are used as they are.
    assert cli(["eval", str(CONFIGS / "eval" / "cifar100_paper.yaml"), "--checkpoint", str(run / "bundle"), "--zoo",
                str(zoo), "--out", str(out), "tasks=2", "seeds=1", "images_per_class=5", "finetune.tasks=0",
                "image_shots=[1]", "baselines=[oracle,selection,retrieval]", "novelty.tasks=0", "diversity.tasks=0",
                f"expect.text_encoder=open_clip:{ARCH}/openai", "plots=false"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["splits"]) == {"train", "unseen_combo", "unseen_class"}
    assert any("reduced run" in n for n in results["notes"])


def test_missing_data_or_weights_fail_before_training(home, tmp_path, capsys, monkeypatch):
    zoo_cfg = str(CONFIGS / "zoo" / "cifar100_paper.yaml")
    enc = f"text_encoder=open_clip:{ARCH}/{CKPT}"
    # The stand-in is not the official archive: without dataset.verify=false the md5 check stops it.
    assert cli(["zoo", "build", zoo_cfg, enc, f"out={tmp_path / 'a'}", *REDUCED_ZOO]) == 2
    assert "dataset.verify=false" in capsys.readouterr().err
    # No weights at the documented place: the error comes before any model trains.
    missing = "text_encoder=open_clip:ViT-B-32-quickgelu/~/.cache/tina/open_clip/ViT-B-32-openai"
    assert cli(["zoo", "build", zoo_cfg, missing, "dataset.verify=false", f"out={tmp_path / 'b'}", *REDUCED_ZOO]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b" / "generic.safetensors").exists()
    # No CIFAR at all.
    monkeypatch.setenv("TINA_CIFAR", str(tmp_path / "nowhere"))
    assert cli(["zoo", "build", zoo_cfg, enc, "dataset.verify=false", f"out={tmp_path / 'c'}", *REDUCED_ZOO]) == 2
    err = capsys.readouterr().err
    assert "cifar100 not found" in err and "dataset.root=PATH" in err and "--" not in err


def test_activation_must_match_the_checkpoint(home, tmp_path):
    from tina.text import build_text_encoder

    # OpenAI's weights (by name) with a GELU architecture: an error naming the -quickgelu one.
    with pytest.raises(TinaError, match=f"open_clip:{ARCH}/"):
        build_text_encoder(f"open_clip:TinaTinyCLIP/{CKPT}")
    # A hub download's open_clip_config.json decides when it is there.
    ckpt = Path(CKPT).expanduser()
    other = tmp_path / "laion" / "open_clip_pytorch_model.bin"
    other.parent.mkdir()
    other.write_bytes(ckpt.read_bytes())
    (other.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    with pytest.raises(TinaError, match="quick_gelu=False"):
        build_text_encoder(f"open_clip:{ARCH}/{other}")
    assert build_text_encoder(f"open_clip:TinaTinyCLIP/{other}").checkpoint == str(other)


def test_cifar_reader_runs_no_code(home, tmp_path):
    """The batches are read without torchvision's unpickling: a pickle naming any other global is refused."""
    from tina.training.datasets import load_dataset

    ds = load_dataset({"name": "cifar100", "verify": False})
    assert ds.classes[:2] == ["apple", "aquarium fish"] and ds.train_x.shape == (360, 32, 32, 3)
    assert np.array_equal(np.bincount(ds.test_y), [10] * 12)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    src = Path(home / ".cache" / "tina" / "cifar" / "cifar-100-python")
    for name in ("test", "meta"):
        (folder / name).write_bytes((src / name).read_bytes())
    (folder / "train").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(TinaError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_dataset({"name": "cifar100", "verify": False, "root": str(tmp_path)})
