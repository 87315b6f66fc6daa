"""The suite runs torch with one thread, in-process and in every subprocess a test starts (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def test_in_process_one_thread():
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_raising_the_thread_count_is_refused():
    with pytest.raises(RuntimeError, match="one thread"):
        torch.set_num_threads(2)
    torch.set_num_threads(1)  # allowed
    assert torch.get_num_threads() == 1


def test_subprocesses_inherit_one_thread():
    # the way test_main_cli, test_data_make_shards and test_cli_help start scripts: the inherited environment.
    # (Lightning's launchers only pick a thread count when OMP_NUM_THREADS is unset.)
    code = "import torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["1"]
