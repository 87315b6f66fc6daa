"""The two checkpoint streams of a run, with a retention setting the docs can promise.

* :func:`full_state_checkpoint`: ``checkpoints/step=<n>.ckpt`` every ``every_n_train_steps`` plus ``last.ckpt``,
  with optimizer, LR schedule, EMA and loop state (what ``-r`` resumes from).
* :class:`WeightSnapshots` (``metrics_over_trainsteps_checkpoint`` in ldm configs): weights-only
  ``trainstep_checkpoints/*.ckpt`` for evaluation and export.

Both keep every file unless ``keep_last_n`` is set, which keeps the newest ``n`` (ranked by step) and deletes older
ones; ``last.ckpt`` is always kept. Lightning's own default (``save_top_k=1`` without a monitor) silently deleted
every earlier periodic checkpoint.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.util import ConfigError


def _retention(params: dict[str, Any], keep_last_n: int | None, where: str) -> dict[str, Any]:
    """``keep_last_n`` as ModelCheckpoint settings: the top n by the ``step`` Lightning always provides."""
    if keep_last_n is None:
        return params
    if int(keep_last_n) < 1:
        raise ConfigError(f"{where}.keep_last_n={keep_last_n}: must be >= 1 (remove it to keep every checkpoint)")
    clash = {k: params[k] for k in ("monitor", "save_top_k", "mode") if params.get(k) not in (None, -1)}
    if clash:
        raise ConfigError(f"{where}.keep_last_n cannot be combined with {clash}; use one or the other")
    return {**params, "monitor": "step", "mode": "max", "save_top_k": int(keep_last_n)}


def full_state_checkpoint(keep_last_n: int | None = None, **params: Any) -> ModelCheckpoint:
    """The full-state ModelCheckpoint (``lightning.modelcheckpoint.params``).

    Args:
        keep_last_n: keep only the newest n periodic checkpoints (None: keep all).
        **params: ModelCheckpoint arguments.
    """
    return ModelCheckpoint(**_retention(params, keep_last_n, "lightning.modelcheckpoint.params"))


class WeightSnapshots(ModelCheckpoint):
    """A weights-only ModelCheckpoint. Its own class name gives it its own Lightning state key, so it can share
    ``every_n_train_steps`` with the full-state checkpoint without Lightning refusing the pair."""


def weight_snapshot_checkpoint(keep_last_n: int | None = None, **params: Any) -> WeightSnapshots:
    """``metrics_over_trainsteps_checkpoint``: weights-only snapshots.

    Args:
        keep_last_n: keep only the newest n snapshots (None: keep all).
        **params: ModelCheckpoint arguments.
    """
    where = "lightning.callbacks.metrics_over_trainsteps_checkpoint.params"
    return WeightSnapshots(**_retention(params, keep_last_n, where))
