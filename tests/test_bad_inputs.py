"""A catalogue of bad inputs through the real `tina` entry point: each must give exit code 2, exactly one
line on stderr, no traceback, and leave every file as it was.

Most run in-process through tina.cli.main (a subprocess would only add interpreter start-up); a few
run as real processes, including `tina info | head -1` (a closed pipe).
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tina.cli import main

ROOT = Path(__file__).parent.parent
TRAIN_CFG = str(ROOT / "configs" / "train" / "fashion_mnist.yaml")
ZOO_CFG = str(ROOT / "configs" / "zoo" / "tiny.yaml")
FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    out = edit(obj)
    path.write_text(json.dumps(obj if out is None else out))


def _variant(src: Path, dest: Path, copy: tuple[str, ...] = ()) -> Path:
    """A folder whose files link to src's, except `copy` (real copies, to be edited)."""
    dest.mkdir(parents=True)
    for p in src.iterdir():
        if p.name in copy:
            shutil.copy(p, dest / p.name)
        else:
            (dest / p.name).symlink_to(p.resolve())
    return dest


# Generator folder edits: (name, file, edit of the parsed JSON) -> each one a corrupt bundle.
BUNDLE_EDITS = {
    "bundle_list": ("bundle.json", lambda m: [m]),
    "bundle_no_target": ("bundle.json", lambda m: m.pop("target")),
    "bundle_kmax_str": ("bundle.json", lambda m: m.update(k_max="ten")),
    "bundle_kmax_list": ("bundle.json", lambda m: m.update(k_max=[10])),
    "bundle_kmax_one": ("bundle.json", lambda m: m.update(k_max=1)),
    "bundle_image_std0": ("bundle.json", lambda m: m["image"].update(std=[0.0])),
    "bundle_image_missing": ("bundle.json", lambda m: m.pop("image")),
    "bundle_image_str": ("bundle.json", lambda m: m.update(image="28x28")),
    "bundle_dit_list": ("bundle.json", lambda m: m.update(dit=[1, 2])),
    "bundle_dit_unknown": ("bundle.json", lambda m: m["dit"].update(wings=2)),
    "bundle_dit_depth_str": ("bundle.json", lambda m: m["dit"].update(width="wide")),
    "bundle_format": ("bundle.json", lambda m: m.update(format="tina-generator/99")),
    "bundle_fingerprint": ("bundle.json", lambda m: m.update(layout_fingerprint="0000")),
    "bundle_anchor_kind": ("bundle.json", lambda m: m.update(anchor={"kind": "magic"})),
    "bundle_anchor_list": ("bundle.json", lambda m: m.update(anchor=[1])),
    "bundle_encoder_int": ("bundle.json", lambda m: m.update(text_encoder=5)),
    "layout_list": ("layout.json", lambda m: [m]),
    "layout_no_segments": ("layout.json", lambda m: m.pop("segments")),
    "layout_token_str": ("layout.json", lambda m: m.update(token_size="big")),
    "scheduler_list": ("scheduler_config.json", lambda m: [m]),
    "vocab_dict": ("vocab.json", lambda m: {"names": m}),
    "vocab_ints": ("vocab.json", lambda m: list(range(len(m)))),
    "vocab_short": ("vocab.json", lambda m: m[:-1]),
}
MODEL_EDITS = {
    "model_list": lambda c: [c],
    "model_no_classes": lambda c: c.pop("classes"),
    "model_classes_str": lambda c: c.update(classes="coat,bag"),
    "model_num_str": lambda c: c.update(num_classes="2"),
    "model_num_mismatch": lambda c: c.update(num_classes=3),
    "model_std0": lambda c: c["image"].update(std=[0]),
    "model_channels": lambda c: c["image"].update(channels=7),
    "model_target": lambda c: c.update(target="resnet-9000"),
    "model_format": lambda c: c.update(format="other/1"),
    "model_sha_list": lambda c: c.update(sha256=[1]),
    "model_sha_wrong": lambda c: c["sha256"].update({"model.safetensors": "0" * 64}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, random_generator, tiny_zoo):
    """Everything the bad inputs point at, made once: good and corrupt generators, models, zoos, configs."""
    from tina.export import save_generated
    from tina.targets import ImageSpec, get_target

    w = tmp_path_factory.mktemp("bad_inputs")
    gen = w / "gen"
    shutil.copytree(random_generator, gen)
    for name, (file, edit) in BUNDLE_EDITS.items():
        _edit_json(_variant(gen, w / name, (file,)) / file, edit)
    (_variant(gen, w / "bundle_notjson", ("bundle.json",)) / "bundle.json").write_text("{not json")
    weights = _variant(gen, w / "bundle_truncated", ("weights.safetensors",)) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (_variant(gen, w / "bundle_missing_vocab") / "vocab.json").unlink()
    from safetensors.torch import load_file, save_file

    t = load_file(gen / "weights.safetensors")
    t.pop(next(k for k in t if k.startswith("dit.")))
    (_variant(gen, w / "bundle_missing_tensor") / "weights.safetensors").unlink()
    save_file(t, w / "bundle_missing_tensor" / "weights.safetensors")

    net = get_target("cnn-5k").build(2, ImageSpec(1, 28, (0.286,), (0.353,)))
    net.classes = ["coat", "bag"]
    model = save_generated(net, w / "model", formats=())
    for name, edit in MODEL_EDITS.items():
        _edit_json(_variant(model, w / name, ("config.json",)) / "config.json", edit)
    flipped = _variant(model, w / "model_flipped", ("model.safetensors",)) / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x10
    flipped.write_bytes(bytes(data))
    (_variant(model, w / "model_notjson", ("config.json",)) / "config.json").write_text("[[[")
    (_variant(model, w / "model_no_weights") / "model.safetensors").unlink()
    evil = net.state_dict() | {"extra.weight": net.state_dict()["head.weight"].clone()}
    save_file(evil, w / "weights_extra.safetensors")

    zoo = w / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    man = json.loads((zoo / "manifest.json").read_text())
    shard = man["shards"]["train"][0]
    data = bytearray((zoo / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (_variant(zoo, w / "zoo_flipped", (shard,)) / shard).write_bytes(bytes(data))
    (_variant(zoo, w / "zoo_truncated", (shard,)) / shard).write_bytes(bytes(data[: len(data) // 3]))
    (_variant(zoo, w / "zoo_missing_shard") / shard).unlink()
    _edit_json(_variant(zoo, w / "zoo_count", ("manifest.json",)) / "manifest.json", lambda m: m["counts"].update(train=999))
    _edit_json(_variant(zoo, w / "zoo_format", ("manifest.json",)) / "manifest.json", lambda m: m.update(format="x"))
    (_variant(zoo, w / "zoo_notjson", ("manifest.json",)) / "manifest.json").write_text("{")
    _edit_json(_variant(zoo, w / "zoo_sums_list", ("manifest.json",)) / "manifest.json", lambda m: m.update(shard_sha256=[1]))
    (w / "empty").mkdir()
    (w / "nonempty").mkdir()
    (w / "nonempty" / "holiday.jpg").write_bytes(b"precious")
    (w / "nonempty" / "config.json").write_text('{"theme": "dark"}')
    shutil.copytree(model, w / "model_with_notes")
    (w / "model_with_notes" / "notes.txt").write_text("mine")
    (w / "file.txt").write_text("just a file")
    (w / "bad.yaml").write_text("trainer: [unclosed\n  max_steps: : 3")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (w / "unknown.yaml").write_text("trainer:\n  warp_speed: 9\n")
    (w / "kmax.yaml").write_text("tasks:\n  k_max: 40\n")
    arr = np.zeros((28, 28), np.uint8)
    Image.fromarray(arr).save(w / "img.png")
    (w / "notimg.png").write_text("not an image")
    readonly = w / "readonly"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    return w


def _cases():
    g = ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", "{w}/out"]
    gen_flags = {
        "steps_0": ["--steps", "0"], "steps_neg": ["--steps", "-1"], "steps_huge": ["--steps", "100000"],
        "steps_1001": ["--steps", "1001"], "steps_text": ["--steps", "many"], "steps_float": ["--steps", "2.5"],
        "seed_neg": ["--seed", "-1"], "seed_2_63": ["--seed", str(2**63)], "seed_2_70": ["--seed", str(2**70)],
        "seed_text": ["--seed", "lucky"], "threads_neg": ["--threads", "-1"], "threads_text": ["--threads", "x"],
        "guidance_neg": ["--guidance", "-5"], "guidance_nan": ["--guidance", "nan"], "guidance_inf": ["--guidance", "inf"],
        "guidance_ninf": ["--guidance", "-inf"], "guidance_huge": ["--guidance", "1e9"], "guidance_text": ["--guidance", "lots"],
        "strength_0": ["--strength", "0"], "strength_big": ["--strength", "1.5"], "strength_nan": ["--strength", "nan"],
        "sampler": ["--sampler", "euler-magic"], "format": ["--format", "exe"], "device": ["--device", "tpu:9"],
        "device_cuda": ["--device", "cuda:7"], "classes_and_prompt": ["--classes", "coat", "bag"],
        "image_no_eq": ["--image", "coat.png"], "image_missing": ["--image", "coat={w}/missing.png"],
        "image_not_image": ["--image", "coat={w}/notimg.png"], "image_dir": ["--image", "coat={w}/empty"],
        "unknown_flag": ["--turbo"],
    }
    cases = {f"generate_{k}": g + v for k, v in gen_flags.items()}
    cases |= {
        "generate_nothing": ["generate", "--checkpoint", "{w}/gen", "-o", "{w}/out"],
        "generate_one_class": ["generate", "--classes", "coat", "--checkpoint", "{w}/gen", "-o", "{w}/out"],
        "generate_dup_class": ["generate", "--classes", "coat", "coat", "--checkpoint", "{w}/gen", "-o", "{w}/out"],
        "generate_empty_class": ["generate", "--classes", "coat", "", "--checkpoint", "{w}/gen", "-o", "{w}/out"],
        "generate_too_many": ["generate", "--classes", *FASHION, "zebra", "--checkpoint", "{w}/gen", "-o", "{w}/out"],
        "generate_empty_prompt": ["generate", "", "--checkpoint", "{w}/gen", "-o", "{w}/out"],
        "generate_out_file": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", "{w}/file.txt"],
        "generate_out_user_folder": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", "{w}/nonempty"],
        "generate_out_user_file_in_model": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", "{w}/model_with_notes"],
        "generate_out_bundle": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", "{w}/gen"],
        "generate_out_proc": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", "/proc/tina-model"],
        "generate_out_empty": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "-o", " "],
        "generate_ckpt_missing": ["generate", "coat vs bag", "--checkpoint", "{w}/nope", "-o", "{w}/out"],
        "generate_ckpt_file": ["generate", "coat vs bag", "--checkpoint", "{w}/file.txt", "-o", "{w}/out"],
        "generate_ckpt_empty": ["generate", "coat vs bag", "--checkpoint", "{w}/empty", "-o", "{w}/out"],
        "generate_ckpt_model": ["generate", "coat vs bag", "--checkpoint", "{w}/model", "-o", "{w}/out"],
    }
    bundles = [*BUNDLE_EDITS, "bundle_notjson", "bundle_truncated", "bundle_missing_vocab", "bundle_missing_tensor"]
    cases |= {f"generate_{b}": ["generate", "coat vs bag", "--checkpoint", f"{{w}}/{b}", "-o", "{w}/out"] for b in bundles}
    cases |= {f"info_{b}": ["info", f"{{w}}/{b}"] for b in bundles[:8]}
    cases |= {"info_missing": ["info", "{w}/nope"], "info_file": ["info", "{w}/file.txt"], "info_extra": ["info", "{w}/gen", "x"]}
    models = [*MODEL_EDITS, "model_flipped", "model_notjson", "model_no_weights", "nonempty", "empty", "gen"]
    cases |= {f"predict_{m}": ["predict", f"{{w}}/{m}", "{w}/img.png"] for m in models}
    cases |= {
        "predict_missing_model": ["predict", "{w}/nope", "{w}/img.png"],
        "predict_model_file": ["predict", "{w}/file.txt", "{w}/img.png"],
        "predict_top_0": ["predict", "{w}/model", "{w}/img.png", "--top", "0"],
        "predict_top_neg": ["predict", "{w}/model", "{w}/img.png", "--top", "-3"],
        "predict_missing_image": ["predict", "{w}/model", "{w}/nope.png"],
        "predict_not_image": ["predict", "{w}/model", "{w}/notimg.png"],
        "predict_image_dir": ["predict", "{w}/model", "{w}/empty"],
        "predict_no_images": ["predict", "{w}/model"],
    }
    t = ["train", TRAIN_CFG, "zoo={w}/zoo", "out={w}/run"]
    cases |= {
        "train_missing_config": ["train", "{w}/nope.yaml"],
        "train_config_dir": ["train", "{w}/empty"],
        "train_bad_yaml": ["train", "{w}/bad.yaml"],
        "train_list_yaml": ["train", "{w}/list.yaml"],
        "train_binary_yaml": ["train", "{w}/binary.yaml"],
        "train_unknown_yaml": ["train", "{w}/unknown.yaml"],
        "train_unknown_key": t + ["trainer.warp=9"],
        "train_no_equals": t + ["trainer.max_steps"],
        "train_bad_override": t + ["trainer.max_steps=[1"],
        "train_steps_text": t + ["trainer.max_steps=lots"],
        "train_max_steps_0": t + ["trainer.max_steps=0"],
        "train_batch_0": t + ["trainer.batch_size=0"],
        "train_batch_neg": t + ["trainer.batch_size=-4"],
        "train_workers_neg": t + ["trainer.workers=-1"],
        "train_ckpt_every_0": t + ["trainer.ckpt_every=0"],
        "train_seed_neg": t + ["trainer.seed=-1"],
        "train_lr_0": t + ["optim.lr=0"],
        "train_lr_nan": t + ["optim.lr=nan"],
        "train_ema_1": t + ["optim.ema_decay=1.5"],
        "train_name_prob": t + ["augment.name_prob=2"],
        "train_val_tasks_0": t + ["val.tasks=0"],
        "train_size": t + ["generator.size=DiT-XXL"],
        "train_sampler": t + ["diffusion.sampler=magic"],
        "train_task_loss_neg": t + ["task_loss.weight=-1"],
        "train_task_loss_nan": t + ["task_loss.weight=nan"],
        "train_task_loss_eps": t + ["task_loss.weight=1", "diffusion.prediction=eps"],
        "train_task_loss_min_t": t + ["task_loss.min_t=2"],
        "train_out_file": ["train", TRAIN_CFG, "zoo={w}/zoo", "out={w}/file.txt"],
        "train_out_proc": ["train", TRAIN_CFG, "zoo={w}/zoo", "out=/proc/tina-run"],
        "train_zoo_missing": ["train", TRAIN_CFG, "zoo={w}/nope", "out={w}/run"],
        "train_zoo_file": ["train", TRAIN_CFG, "zoo={w}/file.txt", "out={w}/run"],
        "train_help_typo": ["train", "--hepl"],
    }
    if os.getuid() != 0:  # root writes anywhere
        cases["train_out_readonly"] = ["train", TRAIN_CFG, "zoo={w}/zoo", "out={w}/readonly/run"]
    for z in ("zoo_flipped", "zoo_truncated", "zoo_missing_shard", "zoo_count", "zoo_format", "zoo_notjson", "zoo_sums_list"):
        cases[f"train_{z}"] = ["train", TRAIN_CFG, f"zoo={{w}}/{z}", "out={w}/run", "trainer.max_steps=2"]
    cases |= {
        "zoo_missing_config": ["zoo", "build", "{w}/nope.yaml"],
        "zoo_bad_yaml": ["zoo", "build", "{w}/bad.yaml"],
        "zoo_unknown_key": ["zoo", "build", ZOO_CFG, "tasks.warp=1", "out={w}/z"],
        "zoo_kmin_1": ["zoo", "build", ZOO_CFG, "tasks.k_min=1", "out={w}/z"],
        "zoo_kmax_40": ["zoo", "build", "{w}/kmax.yaml", "out={w}/z"],
        "zoo_out_file": ["zoo", "build", ZOO_CFG, "out={w}/file.txt"],
        "zoo_rank": ["zoo", "build", ZOO_CFG, "out={w}/z", "--rank", "3", "--world-size", "2"],
        "zoo_no_command": ["zoo"],
        "eval_guidance_nan": ["eval", "--guidance", "nan", "--out", "{w}/ev"],
        "eval_steps_0": ["eval", "--steps", "0", "--out", "{w}/ev"],
        "eval_steps_huge": ["eval", "--steps", "5000", "--out", "{w}/ev"],
        "eval_seeds_0": ["eval", "--seeds", "0", "--out", "{w}/ev"],
        "eval_unknown_key": ["eval", "warp=1", "--out", "{w}/ev"],
        "eval_bad_yaml": ["eval", "{w}/bad.yaml", "--out", "{w}/ev"],
        "eval_two_configs": ["eval", "{w}/bad.yaml", "{w}/list.yaml"],
        "top_no_command": [],
        "top_unknown_command": ["fly"],
        "top_unknown_flag": ["--fast", "info"],
    }
    return cases


CASES = _cases()


def _snapshot(root: Path) -> dict:
    """Every path under root: its type, size, mtime and (for small files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(p)] = ("dir", st.st_mode)
        else:
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 20 else None
            out[str(p)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(autouse=True)
def _no_stale_log_handlers(monkeypatch):
    # Loggers configured while an earlier test captured stderr (lightning's, a main()'s basicConfig) hold a
    # stream pytest has since closed: writing to it would print "--- Logging error ---".
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for lg in loggers:
        live = [h for h in lg.handlers if not getattr(getattr(h, "stream", None), "closed", False)]
        if len(live) != len(lg.handlers):
            monkeypatch.setattr(lg, "handlers", live)


def test_the_catalogue_is_large():
    assert len(CASES) >= 100


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    argv = [a.format(w=world) for a in CASES[name]]
    before = _snapshot(world)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(("error:", "tina", "python -m zoo_builder")), err
    assert _snapshot(world) == before


def test_metadata_errors_name_the_file_and_key(world, capsys):
    assert main(["info", str(world / "bundle_kmax_str")]) == 2
    err = capsys.readouterr().err
    assert "bundle.json" in err and "'k_max'" in err
    assert main(["predict", str(world / "model_num_str"), str(world / "img.png")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "'num_classes'" in err


def test_state_dict_errors_name_the_tensor(world):
    from tina.errors import TinaError
    from tina.targets import ImageSpec, get_target
    from tina.validate import check_state
    from safetensors.torch import load_file

    net = get_target("cnn-5k").build(2, ImageSpec(1, 28, (0.5,), (0.5,)))
    with pytest.raises(TinaError, match="unexpected tensor 'extra.weight'"):
        check_state(net, load_file(world / "weights_extra.safetensors"), "w.safetensors")


def test_printed_names_and_commands_are_safe_to_paste():
    from tina.validate import printable, quoted

    assert printable("coat\x1b[31m\n") == "coat\\x1b[31m\\n"
    assert quoted("my models/a'b") == "'my models/a'\"'\"'b'"


def test_a_full_disk_is_one_line(world, capsys, monkeypatch):
    import errno

    import tina.export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(world / "out"))

    monkeypatch.setattr(tina.export, "save_generated", full)
    before = _snapshot(world)
    assert main(["generate", "coat vs bag", "--checkpoint", str(world / "gen"), "-o", str(world / "out"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert _snapshot(world) == before


SUBPROCESS = {
    "predict_flipped": ["predict", "{w}/model_flipped", "{w}/img.png"],
    "train_bad_yaml": ["train", "{w}/bad.yaml"],
    "generate_seed_2_70": ["generate", "coat vs bag", "--checkpoint", "{w}/gen", "--seed", str(2**70), "-o", "{w}/out"],
}


def test_real_processes_and_a_closed_pipe(world):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = _snapshot(world)
    procs = {n: subprocess.Popen([sys.executable, "-m", "tina.cli", *[a.format(w=world) for a in argv]], env=env, cwd=world,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for n, argv in SUBPROCESS.items()}
    # `tina info | head -1`: the reader is gone before tina writes
    info = subprocess.Popen([sys.executable, "-m", "tina.cli", "info", str(world / "gen")], env=env, cwd=world,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info.stdout.close()
    assert info.wait(timeout=600) == 0 and info.stderr.read() == b""
    for name, p in procs.items():
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert _snapshot(world) == before
