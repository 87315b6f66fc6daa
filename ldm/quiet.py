"""Third-party messages that tell a user of this project nothing: silenced by the entry points, explained once.

:func:`silence_known_noise` (called by ``main.py`` and ``scripts/demo.py``, never at import time) removes:

* Lightning's "Tip: ... install litlogger" line, printed at every ``Trainer`` construction (an advertisement);
* torch's ``FutureWarning`` that ``LeafSpec`` is deprecated, raised inside Lightning's own pytree helper
  (``pytorch_lightning/utilities/_pytree.py``), not by code of this project;
* Lightning's "Found N module(s) in eval mode at the start of training": the frozen first stage and text encoder
  stay in eval mode on purpose (their ``train()`` is disabled, as in ldm). :func:`explain_eval_modules` logs
  which modules these are, once, so the fact is still visible.

On a resume, :func:`silence_resume_noise` also removes Lightning's "Checkpoint directory ... exists and is not
empty" (twice per resume): a resumed run writes into its own checkpoint directory by design, and ``ldm.resume``
has already logged what it found there.

Each filter matches one exact message; every other warning still shows.
"""

from __future__ import annotations

import logging
import warnings

import torch

__all__ = ["explain_eval_modules", "silence_known_noise", "silence_resume_noise"]

log = logging.getLogger(__name__)

#: (message regex, category) of the warnings removed by :func:`silence_known_noise`
WARNINGS = (
    (r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*", FutureWarning),
    (r"Found \d+ module\(s\) in eval mode at the start of training.*", Warning),
)
#: the logger that prints Lightning's tip, and the text that identifies it
_TIP_LOGGER, _TIP_TEXT = "pytorch_lightning.utilities.rank_zero", "litlogger"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TIP_TEXT not in record.getMessage()


def silence_known_noise() -> None:
    """Install the filters described in the module docstring (idempotent)."""
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    tip_logger = logging.getLogger(_TIP_LOGGER)
    if not any(isinstance(f, _DropLitLoggerTip) for f in tip_logger.filters):
        tip_logger.addFilter(_DropLitLoggerTip())


def silence_resume_noise() -> None:
    """The resume-only filter described in the module docstring."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty\.", category=Warning)


def explain_eval_modules(model: torch.nn.Module) -> list[str]:
    """Log, once per call, the top-level sub-modules of ``model`` that are frozen in eval mode; returns their names.

    These are the modules behind Lightning's silenced "module(s) in eval mode" warning.
    """
    frozen = [name for name, child in model.named_children() if not any(m.training for m in child.modules())]
    if frozen:
        count = sum(1 for name in frozen for _ in getattr(model, name).modules())
        log.info("%d modules stay in eval mode during training on purpose (frozen: %s)", count, ", ".join(frozen))
    return frozen
