"""A CSV logger that a resumed run continues instead of starting over.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` in its version directory (and picks a new version
directory when none is given), so a resume used to split the loss curve into ``version_0`` and ``version_1``.
:class:`ResumableCSVLogger` reopens the same version directory, keeps the rows logged before the resume step and
appends; rows at or after it came from the interrupted attempt and are recomputed by the resumed run, so they are
dropped (the TensorBoard logger gets the same cut through ``purge_step``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that continues ``<save_dir>/<name>/version_<version>/metrics.csv`` after a resume.

    Args:
        save_dir: run directory.
        name: sub-directory of the logger.
        version: version directory number (``ldm.run.log_version`` reuses the newest one on resume).
        resume_step: the resumed checkpoint's global step; rows with ``step >= resume_step`` are dropped. None for a
            new run (an existing file is then kept whole).
        **kwargs: ``CSVLogger`` arguments (``prefix``, ``flush_logs_every_n_steps``).
    """

    def __init__(self, save_dir: str, name: str = "csv", version: int | str | None = None,
                 resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self.resume_step = resume_step
        self.continued = False  # the earlier rows are restored once, before the first write

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self.continued:
            return super().experiment
        self.continued = True
        path = Path(self.log_dir) / "metrics.csv"
        header, rows = [], []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header, rows = list(reader.fieldnames or []), list(reader)
            path.unlink()  # the parent's writer would delete it; it is rewritten below
        writer = super().experiment
        if self.resume_step is not None:
            kept = [r for r in rows if r.get("step") in (None, "") or float(r["step"]) < self.resume_step]
            if len(kept) < len(rows):
                log.info("%s: dropped %d rows logged at or after the resume step %d", path, len(rows) - len(kept),
                         self.resume_step)
            rows = kept
        if header:
            with open(path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = list(header)  # new rows append under the same columns
        return writer
