"""Shared fixtures. Tests run on CPU with tiny models; the environment is forced offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.eval_fixtures import checkpoints, image_dir, weights  # noqa: F401 (session fixtures of the eval tests)
from tests.inference_fixtures import ckpts, pair, raw_model  # noqa: F401 (session fixtures of the inference tests)

# Tiny tensors gain nothing from intra-op threads, and on a 2-core CI box threads fight each other (measured:
# a tiny training step takes 0.13 s with 1 thread, 0.5 s with 2 under load). Every test runs torch with one
# thread: forced here (not a default a caller's environment could raise), inherited by subprocesses through the
# environment (torch reads it at import; Lightning keeps a set OMP_NUM_THREADS), and guarded below.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)
_torch_set_num_threads = torch.set_num_threads


def _one_thread_only(n: int) -> None:
    if n != 1:
        raise RuntimeError(f"torch.set_num_threads({n}) in a test: the suite runs torch with one thread "
                           "(tests/conftest.py); measure multi-threaded speed in benchmarks/")
    _torch_set_num_threads(n)


torch.set_num_threads = _one_thread_only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
# Demo-only helpers (scripts/demo_data.py, scripts/demo_report.py) and benchmark helpers (benchmarks/flops.py)
# are not part of the ldm package; the scripts import them as sibling modules, and so do the tests.
for _folder in ("scripts", "benchmarks"):
    if str(REPO / _folder) not in sys.path:
        sys.path.append(str(REPO / _folder))
#: key/shape manifests of the full-size SD2 models (one line per state-dict tensor), generated from the
#: official classes on the meta device; the tests compare our models against them.
REFERENCE = REPO / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
    assert torch.get_num_threads() == 1, "a test left torch with more than one thread"


@pytest.fixture
def repo() -> Path:
    return REPO


def read_reference_tsv(name: str) -> dict[str, tuple[int, ...]]:
    """Parse a ``tests/fixtures/*.tsv`` manifest into {key: shape}."""
    path = REFERENCE / name
    if not path.is_file():
        raise FileNotFoundError(f"reference manifest {path} is missing (it ships in tests/fixtures)")
    out = {}
    for line in path.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        key, _, shape = line.partition("\t")
        out[key] = tuple(int(d) for d in shape.split(",")) if shape else ()
    return out
