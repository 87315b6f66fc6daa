"""Saying once, after *all* loading, which sub-models still hold random weights.

A sub-model cannot know at construction whether its weights stay random: ``LatentDiffusion``'s ``ckpt_path``,
or ``ldm.inference.load_model``, may load them a moment later. So constructors only *note* that their weights
are random (:func:`note_random`), loaders clear the note for every sub-model whose tensors they loaded
(:func:`mark_loaded`), and whoever finishes building reports what is left (:func:`report_random_weights`).
Inside a :func:`deferred_report` block (a parent still building or loading) reports wait for the parent;
constructors decorated with :func:`reports_random_weights` run inside such a block and report when they end,
so a sub-model built by a parent waits for the parent's report.

A frozen sub-model that stays random (a text encoder or autoencoder nobody trains) is a ``WARNING``: its output
is meaningless. A trainable one (the UNet of a run from scratch) is ``INFO``. Each is reported once.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

_ATTR = "_random_weights_reason"
_DEFERRED: contextvars.ContextVar[int] = contextvars.ContextVar("_DEFERRED", default=0)

__all__ = ["deferred_report", "mark_loaded", "note_random", "random_submodules", "report_random_weights",
           "reports_random_weights"]


def note_random(module: nn.Module, reason: str) -> None:
    """Record that ``module``'s weights are random and why (e.g. "no weights file given")."""
    object.__setattr__(module, _ATTR, reason)  # a plain attribute, not a submodule or buffer


def mark_loaded(root: nn.Module, keys: Iterable[str]) -> None:
    """Clear the note of every noted sub-module of ``root`` whose state-dict entries all appear in ``keys``."""
    keys = set(keys)
    for name, module in root.named_modules():
        if getattr(module, _ATTR, None) is None:
            continue
        prefix = f"{name}." if name else ""
        own = [prefix + k for k in module.state_dict()]
        if own and all(k in keys for k in own):
            object.__setattr__(module, _ATTR, None)


def random_submodules(root: nn.Module) -> dict[str, str]:
    """``{name in root: reason}`` of the sub-modules still noted as random."""
    return {name or type(root).__name__: reason for name, module in root.named_modules()
            if (reason := getattr(module, _ATTR, None)) is not None}


@contextmanager
def deferred_report() -> Iterator[None]:
    """Postpone :func:`report_random_weights` calls made inside the block (the caller reports after loading)."""
    token = _DEFERRED.set(_DEFERRED.get() + 1)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def report_random_weights(root: nn.Module) -> list[str]:
    """Log each sub-module of ``root`` that is still random (once), unless inside :func:`deferred_report`.

    Returns the names reported.
    """
    if _DEFERRED.get():
        return []
    reported = []
    for name, module in root.named_modules():
        reason = getattr(module, _ATTR, None)
        if reason is None:
            continue
        object.__setattr__(module, _ATTR, None)  # once
        params = list(module.parameters())
        if any(p.is_meta for p in params):  # built on the meta device: weights come later, by definition
            continue
        label = f"{name} ({type(module).__name__})" if name else type(module).__name__
        if params and not any(p.requires_grad for p in params):
            log.warning("%s keeps RANDOMLY initialised weights after all loading (%s); it is frozen, so its output is "
                        "meaningless", label, reason)
        else:
            log.info("%s starts from random weights (%s) and is trained", label, reason)
        reported.append(name or type(module).__name__)
    return reported


def reports_random_weights(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate a constructor: build (and load) with reports deferred, then report what stayed random."""

    @functools.wraps(init)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        with deferred_report():
            init(self, *args, **kwargs)
        report_random_weights(self)

    return wrapper
