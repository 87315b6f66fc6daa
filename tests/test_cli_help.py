"""Every command-line entry point answers ``--help``: exit 0, help text for every option, and no torch yet.

Each script builds its parser and parses before its heavy imports, so ``--help`` and usage errors answer in a
fraction of a second instead of after seconds of importing torch and Lightning. Timing is not asserted (a
loaded machine makes any threshold flaky); what makes it fast is: the parser runs before torch is imported.
A spy wraps ``argparse.ArgumentParser.parse_known_args`` in a fresh interpreter, records the parser's options
and which heavy modules are already loaded, then lets the real ``--help`` run.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(
    p.relative_to(ROOT).as_posix()
    for p in [ROOT / "main.py", *(ROOT / "scripts").glob("*.py")]
    if 'if __name__ == "__main__":' in p.read_text()
)
HEAVY = ("torch", "pytorch_lightning", "lightning", "open_clip", "torchvision", "webdataset")

SPY = r"""
import argparse, json, runpy, sys
path = sys.argv[1]
sys.argv = [path, "--help"]
sys.path.insert(0, __import__("os").path.dirname(path))
original = argparse.ArgumentParser.parse_known_args
def spy(self, args=None, namespace=None):
    if not getattr(spy, "done", False):
        spy.done = True
        options = [{"flags": a.option_strings or [a.dest], "help": a.help}
                   for a in self._actions if a.help != argparse.SUPPRESS]
        loaded = [m for m in HEAVY if m in sys.modules]
        sys.stderr.write("SPY" + json.dumps({"options": options, "loaded": loaded}) + "\n")
    return original(self, args, namespace)
argparse.ArgumentParser.parse_known_args = spy
runpy.run_path(path, run_name="__main__")
"""


@functools.cache
def run_help(script: str) -> tuple[subprocess.CompletedProcess, dict]:
    code = f"HEAVY = {HEAVY!r}\n" + SPY
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    spied = [line for line in proc.stderr.splitlines() if line.startswith("SPY")]
    assert spied, f"{script}: no argparse parser ran\n{proc.stderr[-2000:]}"
    return proc, json.loads(spied[0][3:])


def test_entry_points_are_found():
    assert {"main.py", "scripts/inpaint.py", "scripts/evaluate.py", "scripts/export.py"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_answers_before_heavy_imports(script):
    proc, spied = run_help(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:200]
    assert spied["loaded"] == [], f"{script} imports {spied['loaded']} before parsing its arguments"
    undocumented = [opt["flags"] for opt in spied["options"] if not (opt["help"] or "").strip()]
    assert not undocumented, f"{script}: options without help text: {undocumented}"
    for opt in spied["options"]:
        assert opt["flags"][0] in proc.stdout or not opt["flags"][0].startswith("-")


@pytest.mark.parametrize("script", ["scripts/inpaint.py", "scripts/evaluate.py", "scripts/make_shards.py",
                                    "scripts/precompute_latents.py", "scripts/demo.py"])
def test_output_folder_flag_is_out_with_outdir_alias(script):
    _, spied = run_help(script)
    assert ["--out", "--outdir"] in [opt["flags"] for opt in spied["options"]]


def test_default_guidance_scale_is_the_library_constant():
    from ldm.defaults import GUIDANCE_SCALE, PRECISION_NAMES
    from ldm.inference import PRECISIONS, SamplingOptions

    assert SamplingOptions().scale == GUIDANCE_SCALE
    assert set(PRECISION_NAMES) == set(PRECISIONS)
    for script in ("scripts/inpaint.py", "scripts/evaluate.py"):
        proc, _ = run_help(script)
        assert f"default {GUIDANCE_SCALE}" in proc.stdout, script
