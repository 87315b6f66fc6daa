"""What every checkpoint records about how it was made, and the checks that use it.

Lightning checkpoints, weights-only snapshots and exports carry:

* ``parameterization`` (top-level key of ``.ckpt`` files, safetensors metadata): what the UNet predicts, so a
  sampler never has to guess (a v model sampled as eps is silently wrong: about 35/255 off on average);
* ``provenance``: a plain dict (loadable with ``weights_only=True``) with the parameterization, the latent scale
  factor in use, the resolved config (when the harness passed it), the package version and the git revision
  of the code (``<sha>`` or ``<sha>-dirty``; None outside a git checkout), and ``saved_at``, the Unix time of the
  save (``-r`` orders checkpoints of the same step by it: it survives copies that reset file times). Safetensors
  store it as JSON text.

:func:`resolve_parameterization` is the one rule every loader follows: a config that states a parameterization
must agree with the checkpoint's record (else :class:`~ldm.checkpoint.CheckpointError`); a config that does not
state one takes the checkpoint's; with neither, LatentDiffusion's default ("eps") applies.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from ldm.checkpoint import CheckpointError

log = logging.getLogger(__name__)

PARAMETERIZATION_KEY = "parameterization"
PROVENANCE_KEY = "provenance"
#: distribution name of this project (pyproject.toml)
DISTRIBUTION = "sd2-inpaint"
#: LatentDiffusion's constructor default, used when neither the config nor the checkpoint says
DEFAULT_PARAMETERIZATION = "eps"


def package_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """``<sha>`` (``<sha>-dirty`` with uncommitted changes to tracked files) of the checkout holding ``ldm``."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # an installed copy inside some other repository
        return None
    sha = git("rev-parse", "HEAD")
    if sha is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{sha}-dirty" if dirty else sha


def record(parameterization: str, scale_factor: float | None, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The provenance dict of a checkpoint written now (plain types only; None where unknown)."""
    return {
        "parameterization": parameterization,
        "scale_factor": float(scale_factor) if scale_factor is not None else None,
        "config": dict(config) if config is not None else None,
        "package_version": package_version(),
        "git_revision": git_revision(),
        "saved_at": time.time(),
    }


def to_metadata(prov: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata (string values only) for a provenance dict."""
    return {PARAMETERIZATION_KEY: str(prov["parameterization"]), PROVENANCE_KEY: json.dumps(prov, sort_keys=True)}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        from ldm.checkpoint import first_line

        raise CheckpointError(f"{path} is not a readable .safetensors file ({first_line(e)})") from e


def read(path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records: at least ``parameterization`` (None when unrecorded) and the provenance keys it
    has. ``checkpoint`` is the already loaded ``.ckpt`` dict (a multi-GB file is not read twice)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        prov = json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else {}
        prov.setdefault("parameterization", meta.get(PARAMETERIZATION_KEY))
        if "global_step" not in prov and str(meta.get("global_step", "")).isdigit():
            prov["global_step"] = int(meta["global_step"])
        return prov
    if checkpoint is None:
        from ldm.checkpoint import load_checkpoint_file

        checkpoint = load_checkpoint_file(path, mmap=True)
    return from_checkpoint(checkpoint)


def from_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a loaded ``.ckpt`` dict (``parameterization`` is None when unrecorded)."""
    prov = dict(checkpoint.get(PROVENANCE_KEY) or {})
    value = checkpoint.get(PARAMETERIZATION_KEY, prov.get("parameterization"))
    prov["parameterization"] = value if isinstance(value, str) else None
    return prov


def resolve_parameterization(configured: str | None, recorded: str | None, source: str) -> str:
    """The parameterization to sample with (see the module docstring).

    Args:
        configured: ``model.params.parameterization`` if the config states it, else None.
        recorded: the checkpoint's record, else None.
        source: the checkpoint, for messages.
    """
    if configured is not None and recorded is not None and configured != recorded:
        raise CheckpointError(
            f"{source} was trained with parameterization '{recorded}' but the config says '{configured}'; "
            f"sampling would be wrong. Use a config with model.params.parameterization: {recorded} (or drop the "
            "key to take the checkpoint's)."
        )
    if configured is not None:
        return configured
    if recorded is not None:
        log.info("%s: parameterization '%s' taken from the checkpoint (the config does not set it)", source, recorded)
        return recorded
    log.warning("%s records no parameterization and the config sets none: assuming '%s'", source,
                DEFAULT_PARAMETERIZATION)
    return DEFAULT_PARAMETERIZATION


def same_scale(a: float | Any, b: float | Any) -> bool:
    """Whether two latent scale factors are the same at float32 precision.

    A ``scale_by_std`` run stores its factor as a float32 tensor (0.18215 reads back as 0.1821500062942505), so an
    exact comparison with a config's decimal would refuse the very value the config states.
    """
    import math

    return math.isclose(float(a), float(b), rel_tol=1e-6)
