"""The `tina` command: every subcommand's --help, a real generate + predict, and bad input → exit 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tina.cli import main

SUBCOMMANDS = ["generate", "predict", "info", "zoo", "train", "eval", "demo"]


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", ["generate", "predict", "info"])
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: tina " + sub in capsys.readouterr().out


@pytest.mark.parametrize("argv,keys", [(["zoo", "build", "--help"], ["tasks.k_max", "dataset.root", "finetune.steps"]),
                                       (["train", "--help"], ["trainer.max_steps", "diffusion.sampler", "optim.lr", "val.tasks"])])
def test_delegated_help_lists_the_config_keys(argv, keys, capsys):
    """`tina zoo build --help` / `tina train --help` list every key of their dataclass config, with its default."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "config keys" in out
    for key in keys:
        assert f"  {key}: " in out, key


def test_version(capsys):
    from tina import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tina {__version__}"


def test_training_commands_without_the_train_extra_say_which_extra(tmp_path):
    """Without lightning (the [train] extra), `tina train` is one line naming the extra and exit 2."""
    code = ("import sys; sys.modules['lightning'] = None; from tina.cli import main; "
            "sys.exit(main(['train', 'configs/train/fashion_mnist.yaml']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).parents[1]))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: tina.training (training, zoo building and evaluation) needs the [train] "
                                             "extra (lightning not installed): pip install 'tina[train]'"]


def write_png(path, value=200):
    arr = np.zeros((28, 28), dtype=np.uint8)
    arr[6:22, 8:20] = value
    Image.fromarray(arr).save(path)
    return path


def test_generate_then_predict(random_generator, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["generate", "is it a coat or a bag?", "--checkpoint", str(random_generator), "-o", str(out), "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "0=coat, 1=bag" in text and str(out) in text
    assert (out / "model.pt2").is_file() and (out / "model.safetensors").is_file()
    img = write_png(tmp_path / "x.png")
    assert main(["predict", str(out), str(img)]) == 0
    line = capsys.readouterr().out
    assert "x.png:" in line and ("coat" in line or "bag" in line)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tina.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", ""], "empty"),
        (["generate", "sandals"], "only one class"),
        (["generate", "sandals vs sandals"], "twice"),
        (["generate", "--classes", *[f"c{i}" for i in range(11)]], "at most 10"),
        (["generate", "coat vs bag", "--checkpoint", "/nonexistent/ckpt"], "checkpoint"),
        (["generate", "coat vs bag", "-o", "/proc/forbidden/model"], "cannot write"),
    ],
)
def test_bad_input_exits_2(random_generator, args, needle, capsys):
    if "--checkpoint" not in args:
        args = [*args, "--checkpoint", str(random_generator)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err


def test_user_errors_in_a_real_process_have_no_traceback(tmp_path, random_generator):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    out = tmp_path / "m"
    assert run_cli("generate", "coat vs bag", "--checkpoint", str(random_generator), "-o", str(out), "--steps", "2").returncode == 0
    r = run_cli("predict", str(out), str(not_image))
    assert r.returncode == 2 and "not a readable image" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", str(tmp_path), str(not_image))
    assert r.returncode == 2 and "not a generated model folder" in r.stderr
