"""LR multipliers with ldm's class names and parameters, for ``scheduler_config`` targets.

Each scheduler is a plain callable ``step -> multiplier``; :meth:`LatentDiffusion.configure_optimizers` wraps
it in ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimizer step, so the learning rate is
``base_lr * f(step)``.

SD2's inpainting recipe (DECISIONS D2) uses :class:`LambdaLinearScheduler` with ``f_start=1e-6, f_max=f_min=1``: a
linear warm-up to the full LR, then constant.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence

from ldm.config_schema import NonNegativeFloat, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)


def _as_list(name: str, values: Sequence[float] | float, n: int) -> list[float]:
    vals = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(vals) != n:
        raise ValueError(f"scheduler_config: '{name}' has {len(vals)} entries but there are {n} cycles")
    return [float(v) for v in vals]


class LambdaLinearScheduler:
    """Piecewise schedule: per cycle, linear warm-up from ``f_start`` to ``f_max``, then linear from ``f_max``
    towards ``f_min`` over the rest of the cycle.

    Args:
        warm_up_steps: warm-up length per cycle, in optimizer steps.
        f_min: multiplier at the end of each cycle.
        f_max: multiplier reached at the end of warm-up.
        f_start: multiplier at step 0 of each cycle.
        cycle_lengths: length of each cycle in steps. COMPAT: ldm treats the cumulative sums as cycle
            boundaries and a step ``n`` belongs to the first cycle whose boundary is >= n.
        verbosity_interval: log the multiplier every this many steps (0 = never).
    """

    def __init__(
        self,
        warm_up_steps: Sequence[NonNegativeInt],
        f_min: Sequence[NonNegativeFloat],
        f_max: Sequence[NonNegativeFloat],
        f_start: Sequence[NonNegativeFloat],
        cycle_lengths: Sequence[PositiveInt],
        verbosity_interval: NonNegativeInt = 0,
    ) -> None:
        n = len(cycle_lengths)
        if n == 0:
            raise ValueError("scheduler_config: 'cycle_lengths' must list at least one cycle")
        self.lr_warm_up_steps = [int(w) for w in _as_list("warm_up_steps", warm_up_steps, n)]
        self.f_min = _as_list("f_min", f_min, n)
        self.f_max = _as_list("f_max", f_max, n)
        self.f_start = _as_list("f_start", f_start, n)
        self.cycle_lengths = [int(c) for c in cycle_lengths]
        for i, (w, c) in enumerate(zip(self.lr_warm_up_steps, self.cycle_lengths)):
            if w < 0 or c <= 0:
                raise ValueError(f"scheduler_config: cycle {i} needs warm_up_steps >= 0 and cycle_lengths > 0")
        self.cum_cycles = [0]
        for c in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + c)
        self.verbosity_interval = verbosity_interval
        self.last_f = 0.0

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle that step ``n`` belongs to (clamped to the last cycle)."""
        idx = bisect.bisect_left(self.cum_cycles, n, lo=1) - 1
        return min(max(idx, 0), len(self.cycle_lengths) - 1)

    def schedule(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        warm = self.lr_warm_up_steps[cycle]
        if n < warm:
            f = self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * n / warm
        else:
            length = self.cycle_lengths[cycle]
            f = self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            log.info("step %d: lr multiplier %.3e (cycle %d)", n, f, cycle)
        self.last_f = f
        return f

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class LambdaWarmUpCosineScheduler:
    """Linear warm-up to ``lr_max`` then cosine decay to ``lr_min`` at ``max_decay_steps`` (ldm-compatible).

    Args:
        warm_up_steps: warm-up length in optimizer steps.
        lr_min: multiplier after ``max_decay_steps``.
        lr_max: multiplier at the end of warm-up.
        lr_start: multiplier at step 0.
        max_decay_steps: step at which the cosine reaches ``lr_min``.
        verbosity_interval: log the multiplier every this many steps (0 = never).
    """

    def __init__(
        self,
        warm_up_steps: NonNegativeInt,
        lr_min: NonNegativeFloat,
        lr_max: NonNegativeFloat,
        lr_start: NonNegativeFloat,
        max_decay_steps: NonNegativeInt,
        verbosity_interval: NonNegativeInt = 0,
    ) -> None:
        if max_decay_steps < warm_up_steps:
            raise ValueError("scheduler_config: 'max_decay_steps' must be >= 'warm_up_steps'")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start, self.lr_min, self.lr_max = lr_start, lr_min, lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval
        self.last_lr = 0.0

    def schedule(self, n: int) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            log.info("step %d: lr multiplier %.3e", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            span = max(self.lr_max_decay_steps - self.lr_warm_up_steps, 1)
            t = min((n - self.lr_warm_up_steps) / span, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n: int) -> float:
        return self.schedule(n)
