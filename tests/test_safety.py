"""Faults and hostile files: nothing in a zoo or a cache runs code, nothing the user owns is lost,
corruption is caught by checksums, and a killed training run resumes exactly."""

import hashlib
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tina.errors import TinaError
from tina.training.shardio import ShardFile, read_shards

ROOT = Path(__file__).parent.parent


class Plant:
    """Unpickling this writes a marker file: proof that a decoder ran code from data."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def _npy(a, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def _members(k=2, params=None, extra=None) -> dict:
    params = np.zeros(10, np.float32) if params is None else params
    return {"params.npy": _npy(params), "emb.npy": _npy(np.ones((k, 2, 4), np.float16)),
            "classes.json": json.dumps({"names": ["a", "b"][:k], "ids": list(range(k))}).encode(),
            "prompts.json": b"[]", "metrics.json": b"{}", **(extra or {})}


def fake_zoo(folder: Path, samples: list[tuple[str, dict]]) -> Path:
    """A one-shard zoo holding `samples`, with the manifest fields the readers need."""
    from zoo_builder.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "train-000000.tar", samples)
    sha = hashlib.sha256((folder / "train-000000.tar").read_bytes()).hexdigest()
    man = {"format": "tina-zoo/1", "shards": {"train": ["train-000000.tar"]}, "shard_sha256": {"train-000000.tar": sha},
           "counts": {"train": len(samples)}}
    (folder / "manifest.json").write_text(json.dumps(man))
    return folder


# ---- 1. no code from data files ----------------------------------------------------------------


def test_planted_pickle_members_in_a_shard_are_never_unpickled(tmp_path):
    from tina.training.data import load_split

    marker = tmp_path / "marker"
    evil = pickle.dumps(Plant(marker))
    assert not marker.exists()
    zoo = fake_zoo(tmp_path / "zoo", [("task-000000", _members(extra={"pyd": evil, "pth": evil, "pickle": evil}))])
    models = load_split(zoo, "train")
    assert len(models) == 1 and models[0]["classes"] == ["a", "b"]
    assert not marker.exists()
    # an object-array .npy (pickle inside) in a member Tina does read is refused, not loaded
    obj = np.empty(1, dtype=object)
    obj[0] = Plant(marker)
    bad = fake_zoo(tmp_path / "bad", [("task-000000", {**_members(), "params.npy": _npy(obj, allow_pickle=True)})])
    with pytest.raises(TinaError, match="not a plain numeric .npy"):
        load_split(bad, "train")
    assert not marker.exists()


def test_no_webdataset_decoder_is_used_anywhere():
    # webdataset's default decoders unpickle .pyd/.pth members: Tina reads shards only through tina.training.shardio
    for path in [*ROOT.glob("tina/**/*.py"), *ROOT.glob("zoo_builder/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("serve/*.py")]:
        text = path.read_text()
        assert "import webdataset" not in text and ".decode()" not in text, path


EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void plant(void) { FILE *f = fopen("%s", "w"); if (f) { fputs("code ran", f); fclose(f); } }
"""


def _evil_library(tmp_path: Path, marker: Path) -> bytes:
    src = tmp_path / "evil.c"
    src.write_text(EVIL_C % marker)
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(tmp_path / "evil.so")], check=True)
    return (tmp_path / "evil.so").read_bytes()


def _plant(path: Path, data: bytes) -> None:
    # a new file renamed over the old (writing in place would corrupt the library this process has mapped)
    tmp = path.with_name(path.name + ".planted")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _c_compiler() -> bool:
    import shutil

    return shutil.which("cc") is not None


@pytest.mark.skipif(not _c_compiler(), reason="needs a C compiler")
def test_a_library_planted_in_the_kernel_cache_is_not_loaded(tmp_path, monkeypatch, caplog):
    from zoo_builder import kernels

    marker = tmp_path / "marker"
    evil = _evil_library(tmp_path, marker)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TINA_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(kernels.library, "_loaded", {})
    assert kernels.load() is not None
    (lib,) = cache.glob("kernels-*.so")
    good = lib.read_bytes()
    assert (cache / (lib.name + ".sha256")).read_text() == hashlib.sha256(good).hexdigest()

    # 1. replaced in a private cache: the checksum differs, so it is rebuilt, never loaded
    _plant(lib, evil)
    monkeypatch.setattr(kernels.library, "_loaded", {})
    assert kernels.load() is not None
    assert not marker.exists() and lib.read_bytes() != evil
    # 2. a cache folder others may write (a shared XDG_CACHE_HOME): not trusted even with a matching checksum
    _plant(lib, evil)
    (cache / (lib.name + ".sha256")).write_text(hashlib.sha256(evil).hexdigest())
    os.chmod(cache, 0o777)
    monkeypatch.setattr(kernels.library, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="zoo_builder.kernels"):
        assert kernels.load() is not None  # built privately instead
    assert "not private" in caplog.text and not marker.exists()
    # 3. a library without its checksum file is never trusted
    os.chmod(cache, 0o700)
    (cache / (lib.name + ".sha256")).unlink()
    monkeypatch.setattr(kernels.library, "_loaded", {})
    assert kernels.load() is not None and not marker.exists()
    assert (cache / (lib.name + ".sha256")).read_text() == hashlib.sha256(lib.read_bytes()).hexdigest()
    monkeypatch.setattr(kernels.library, "_loaded", {})


# ---- 2. nothing lost ------------------------------------------------------------------------------


def _tiny_net():
    from tina.targets import ImageSpec, get_target

    net = get_target("cnn-5k").build(2, ImageSpec(1, 28, (0.5,), (0.25,)))
    net.classes = ["coat", "bag"]
    return net


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_output_refuses_folders_and_files_tina_did_not_write(tmp_path):
    from tina.export import save_generated

    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    (user / "config.json").write_text('{"theme": "dark"}')  # any config.json is not enough
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    before = _tree(tmp_path)
    for out in (user, afile):
        with pytest.raises(TinaError, match="not a Tina model folder|not a folder"):
            save_generated(_tiny_net(), out, formats=())
    assert _tree(tmp_path) == before


def test_replacing_a_model_keeps_user_files_and_leaves_no_temporary_folder(tmp_path):
    from tina.export import load_generated, save_generated

    out = tmp_path / "model"
    save_generated(_tiny_net(), out, formats=())
    (out / "README.md").write_text("my notes")
    with pytest.raises(TinaError, match="files Tina did not write .README.md"):
        save_generated(_tiny_net(), out, formats=())
    assert (out / "README.md").read_text() == "my notes" and (out / "model.safetensors").is_file()
    (out / "README.md").unlink()
    save_generated(_tiny_net(), out, formats=())  # its own folder: replaced
    assert load_generated(out).classes == ["coat", "bag"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_crash_while_replacing_keeps_the_old_model_and_stale_temporaries_are_cleaned(tmp_path):
    from tina import atomic
    from tina.export import FOLDER, load_generated, save_generated

    out = tmp_path / "model"
    save_generated(_tiny_net(), out, formats=())
    old = _tree(out)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_folder(out, FOLDER) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert _tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a killed process (no longer running) left its temporary folder: the next write removes it
    dead = 2**22 + 12345
    stale = tmp_path / f".model{atomic.TMP_TAG}{dead}-x1"
    stale.mkdir()
    # killed between the two renames of the fallback swap: the old model is put back, never lost
    shutil_old = tmp_path / f".model{atomic.TMP_TAG}{dead}-old-x2"
    shutil_old.mkdir()
    os.rename(out, shutil_old / "model")
    atomic.remove_stale(out)
    assert _tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert load_generated(out).classes == ["coat", "bag"]


# ---- 3. integrity ---------------------------------------------------------------------------------


def test_a_flipped_bit_in_a_model_is_caught(tmp_path):
    from tina.export import load_generated, save_generated

    out = save_generated(_tiny_net(), tmp_path / "model", formats=())
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(TinaError, match="does not match the sha256"):
        load_generated(out)


def test_a_flipped_byte_in_a_shard_is_caught(tmp_path):
    from tina.training.data import load_split

    zoo = fake_zoo(tmp_path / "zoo", [("task-000000", _members())])
    shard = zoo / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TinaError, match="does not match the checksum"):
        load_split(zoo, "train")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e4])
def test_non_finite_or_absurd_zoo_parameters_stop_reading_and_building(tmp_path, value):
    from zoo_builder.shards import encode_sample
    from zoo_builder.tasks import Task

    params = np.zeros(10, np.float32)
    params[3] = value
    zoo = fake_zoo(tmp_path / "zoo", [("task-000000", _members(params=params))])
    with pytest.raises(TinaError, match="NaN or infinite|magnitude"):
        read_shards([ShardFile(zoo / "train-000000.tar", None)])
    task = Task("task-000007", "train", (0, 1))
    with pytest.raises(TinaError, match="task-000007"):
        encode_sample(task, torch.from_numpy(params), ["a", "b"], torch.ones(2, 2, 4), [[], []], {})


def test_the_zoo_manifest_records_every_shards_checksum(tiny_zoo):
    man = json.loads((tiny_zoo / "manifest.json").read_text())
    names = [n for split in man["shards"].values() for n in split]
    assert names and set(man["shard_sha256"]) == set(names)
    for n in names:
        assert man["shard_sha256"][n] == hashlib.sha256((tiny_zoo / n).read_bytes()).hexdigest()


# ---- 5. exact resume --------------------------------------------------------------------------------


def _batches(zoo, start_step, n, workers):
    from functools import partial

    from tina.training.data import AugmentConfig, ZooStream, collate, layout_from_manifest, read_manifest, shard_urls

    man = read_manifest(zoo)
    layout = layout_from_manifest(man)
    stream = ZooStream(shard_urls(zoo, man, "train"), layout, AugmentConfig(), seed=3, batch_size=4, start_step=start_step)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=partial(collate, layout=layout))
    return [b for _, b in zip(range(n), loader)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_gives_the_batches_the_uninterrupted_one_gave(tiny_zoo, workers):
    full = _batches(tiny_zoo, 0, 9, workers)
    resumed = _batches(tiny_zoo, 5, 4, workers)
    for a, b in zip(full[5:], resumed):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(full[0]["x0"], full[1]["x0"])  # the stream does move


def _metrics(run: Path) -> dict[int, float]:
    import csv

    loss = {}
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                loss[int(row["step"])] = float(row["train/loss"])
    return loss


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_same_losses_and_weights(tiny_zoo, tmp_path):
    from safetensors.torch import load_file

    from conftest import TINY_TRAIN

    cfg = ROOT / "configs" / "train" / "fashion_mnist.yaml"
    common = [f"zoo={tiny_zoo}", "trainer.max_steps=30", *TINY_TRAIN, "trainer.ckpt_every=5", "trainer.log_every=1",
              "trainer.final_val_tasks=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(out, wait_for=None):
        cmd = [sys.executable, "-m", "tina.cli", "train", str(cfg), f"out={out}", *common]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_for is None:
            assert proc.wait(timeout=600) == 0
            return
        deadline = time.time() + 600
        while not list((out / "checkpoints").glob(wait_for)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    run(tmp_path / "straight")
    killed = tmp_path / "killed"
    run(killed, wait_for="last.ckpt")  # killed right after its first checkpoint (checkpoints are written atomically)
    assert not (killed / "bundle").exists()
    run(killed)
    a, b = _metrics(tmp_path / "straight"), _metrics(killed)
    assert len(a) >= 29 and a == {s: b[s] for s in a}
    wa, wb = load_file(tmp_path / "straight" / "bundle" / "weights.safetensors"), load_file(killed / "bundle" / "weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
