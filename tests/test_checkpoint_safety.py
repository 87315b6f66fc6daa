"""No entry point unpickles arbitrary objects, whatever the environment says; broken files give one line.

The payload is a real ``__reduce__`` that creates a marker file when unpickled (checked to work with
``weights_only=False``). Every entry point -- ``main.py`` init (``model.params.ckpt_path``), ``-r`` on a run
directory, ``-r`` on a file, Lightning's own resume load (the CheckpointIO plugin), ``inpaint.py``, ``evaluate.py``
and ``export.py`` -- must refuse it with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set: exit code 2, one error line,
no marker, and no advice to load with ``weights_only=False``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from ldm.checkpoint import CheckpointError, atomic_checkpoint_io, load_checkpoint_file
from tests.helpers import REPO, build_tiny, load_script

TINY = str(REPO / "configs/tiny/inpaint.yaml")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A realistic training checkpoint (tiny model tensors, optimizer/loop keys) with one payload inside."""
    d = tmp_path_factory.mktemp("evil")
    marker = d / "MARKER"
    sd = build_tiny("inpaint").state_dict()
    obj = {"state_dict": sd, "global_step": 3, "epoch": 0, "optimizer_states": [{}], "lr_schedulers": [],
           "loops": {}, "callbacks": {"x": Payload(marker)}}
    run = d / "2026-01-01T00-00-00_inpaint"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    path = run / "checkpoints" / "last.ckpt"
    torch.save(obj, path)
    torch.load(path, weights_only=False)  # the payload is real: unpickling it unsafely creates the marker
    assert marker.exists()
    marker.unlink()
    return {"ckpt": path, "run": run, "marker": marker}


@pytest.fixture
def unsafe_env(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _refused(rc: int, caplog, evil) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2
    assert len(errors) == 1 and "\n" not in errors[0].getMessage(), [r.getMessage() for r in errors]
    msg = errors[0].getMessage()
    assert str(evil["ckpt"]) in msg and "pickled Python object (io.open)" in msg
    assert "weights_only" not in msg
    assert not evil["marker"].exists()


def test_main_init_checkpoint(evil, unsafe_env, caplog, tmp_path):
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path), f"model.params.ckpt_path={evil['ckpt']}"])
    _refused(rc, caplog, evil)


@pytest.mark.parametrize("target", ["run", "ckpt"])
def test_main_resume(evil, unsafe_env, caplog, target):
    rc = main.main(["-r", str(evil[target]), "--train"])
    _refused(rc, caplog, evil)


def test_lightning_resume_load_goes_through_the_safe_loader(evil, unsafe_env):
    with pytest.raises(CheckpointError, match=r"io\.open"):
        atomic_checkpoint_io().load_checkpoint(evil["ckpt"], weights_only=False)
    assert not evil["marker"].exists()


def test_inpaint_script(evil, unsafe_env, caplog, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    rc = load_script("inpaint").main(["--config", TINY, "--ckpt", str(evil["ckpt"]), "--image", str(tmp_path / "a.png"),
                                      "--mask", str(tmp_path / "m.png"), "--prompt", "x", "--outdir", str(tmp_path)])
    _refused(rc, caplog, evil)


def test_evaluate_script(evil, unsafe_env, caplog, tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "imgs" / "a.jpg")
    rc = load_script("evaluate").main(["--config", TINY, "--ckpt", str(evil["ckpt"]), "--images",
                                       str(tmp_path / "imgs"), "--size", "64", "--out", str(tmp_path / "out")])
    _refused(rc, caplog, evil)


def test_export_script(evil, unsafe_env, caplog, tmp_path):
    rc = load_script("export").main(["--config", TINY, "--ckpt", str(evil["ckpt"]), "--out",
                                     str(tmp_path / "x.safetensors")])
    _refused(rc, caplog, evil)


def test_cli_prints_one_line_and_no_traceback(evil):
    """The real command line, in its own process, with the variable set in its environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    r = subprocess.run([sys.executable, "main.py", "-r", str(evil["ckpt"]), "--train"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "weights_only" not in r.stderr and not evil["marker"].exists()


# ------------------------------------------------------------------------------------- broken files, any format
def _broken_files(d: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    good_ckpt, good_st = d / "good.ckpt", d / "good.safetensors"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good_ckpt)
    save_file({"w": torch.ones(1000)}, str(good_st))
    files = {}
    for name, data in {
        "empty.ckpt": b"",
        "empty.safetensors": b"",
        "truncated.ckpt": good_ckpt.read_bytes()[:2000],
        "truncated.safetensors": good_st.read_bytes()[:100],
        "text.ckpt": b"not a checkpoint\n",
        "text.safetensors": b"not a checkpoint\n",
        "legacy_cut.pt": torch.serialization.pickle.dumps({"a": 1})[:5],
    }.items():
        (d / name).write_bytes(data)
        files[name] = d / name
    return files


def test_broken_files_of_every_format_give_one_line(tmp_path):
    for name, path in _broken_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint_file(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg and "weights_only" not in msg, (name, msg)
        assert ("empty (0 bytes)" in msg) == name.startswith("empty"), (name, msg)


def test_files_cut_short_are_found_from_their_ends_before_anything_is_loaded(tmp_path, monkeypatch):
    # check_checkpoint_path is what every script runs before building a model or reading images; it reads the
    # ends of a file only, so a truncated copy is one line there instead of an error minutes later.
    from ldm.checkpoint import check_checkpoint_path

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the file was loaded"))
    files = _broken_files(tmp_path)
    for name in ("truncated.ckpt", "truncated.safetensors", "empty.ckpt"):
        with pytest.raises(CheckpointError, match="is truncated|is empty") as info:
            check_checkpoint_path(files[name])
        assert str(files[name]) in str(info.value), name
    good = tmp_path / "good.safetensors"
    cut_data = tmp_path / "cut_data.safetensors"  # the header is whole, the tensor data stops early
    cut_data.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"its header describes \d+ bytes, the file has"):
        check_checkpoint_path(cut_data)
    for whole in ("good.ckpt", "good.safetensors", "text.ckpt", "text.safetensors", "legacy_cut.pt"):
        assert check_checkpoint_path(tmp_path / whole) == tmp_path / whole  # others are the loader's to judge


@pytest.mark.parametrize("name", ["empty.ckpt", "truncated.safetensors"])
def test_main_and_export_with_a_broken_init_file(tmp_path, caplog, name):
    path = _broken_files(tmp_path)[name]
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path / "logs"), f"model.params.ckpt_path={path}"])
    assert rc == 2
    rc = load_script("export").main(["--config", TINY, "--ckpt", str(path), "--out", str(tmp_path / "x.ckpt")])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(str(path) in e and "\n" not in e for e in errors), errors


def test_a_legacy_file_cut_inside_its_pickle_is_damage_not_a_refused_object(tmp_path):
    # Cut at the wrong byte, a legacy pickle spells a global no module has ("collections.OrderedDic"); calling
    # that a refused object would send the user hunting for code they never pickled.
    from collections import OrderedDict

    whole = tmp_path / "legacy.pt"
    torch.save({"state_dict": OrderedDict(w=torch.ones(3))}, whole, _use_new_zipfile_serialization=False)
    data = whole.read_bytes()
    said = set()
    for cut in range(20, len(data) - 1, 3):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint_file(path)
        said.add("pickled Python object" in str(info.value))
    assert said == {False}
    import argparse

    foreign = tmp_path / "foreign.pt"  # a real global that is not allowed is still refused as such
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(a=1)}, foreign)
    with pytest.raises(CheckpointError, match=r"contains a pickled Python object \(argparse.Namespace\)"):
        load_checkpoint_file(foreign)
