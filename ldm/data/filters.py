"""Sample filters on img2dataset json metadata and captions (DECISIONS D7).

One :class:`MetadataFilter` holds every threshold and answers, for a sample's json and caption, either
``None`` (keep) or the name of the counter that explains the skip (see ``ldm.data.stats``). Thresholds:

* ``min_size``: ``original_width`` and ``original_height`` both >= min_size (img2dataset writes the size of
  the image before its own resize under these names; the reference loader reads the same fields). This is a
  cheap pre-filter only: json can lie, so the stored image's own size is checked as well, from its header
  (``ldm.data.rgb.ImageLimits``; shards stored below ``min_size`` are therefore filtered as ``too_small``);
* ``p_unsafe_threshold``: keep ``punsafe <= threshold`` (LAION's NSFW-classifier probability);
* ``max_pwatermark``: keep ``pwatermark <= threshold`` (disabled at 1.0, as in the reference);
* ``min_aesthetic``: keep ``aesthetic >= threshold`` (``AESTHETIC_SCORE`` is accepted as the field name too);
* ``words``: drop captions containing any listed word or phrase (case-insensitive, whole words).

A field that is absent, ``null`` or NaN follows ``missing_field_policy``: ``"drop"`` skips the sample and
counts it as bad data (``missing_size``, ``missing_punsafe`` ...), which is what the reference does for size and
watermark; ``"keep"`` lets it through. Word lists load from a yaml file: a list of strings, or a mapping
with a ``words`` list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm.util import ConfigError

MissingFieldPolicy = Literal["drop", "keep"]
_REPO_ROOT = Path(__file__).resolve().parents[2]
AESTHETIC_FIELDS = ("aesthetic", "AESTHETIC_SCORE")


def _number(meta: Mapping[str, Any], *names: str) -> float | None:
    """The first of ``names`` present in ``meta`` as a finite number, else None."""
    for name in names:
        value = meta.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def load_word_list(spec: str | Sequence[str] | None, key: str = "filter_word_list") -> tuple[str, ...]:
    """Words from a yaml path (absolute, relative to the working directory, or to the repo root) or a list."""
    if spec is None:
        return ()
    if not isinstance(spec, str):
        return tuple(str(w) for w in spec)
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = _REPO_ROOT / spec
    if not path.is_file():
        raise ConfigError(f"'{key}': word list file '{spec}' not found in the working directory or {_REPO_ROOT}")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(content, Mapping):
        content = content.get("words")
    if not isinstance(content, list) or not all(isinstance(w, str) for w in content):
        raise ConfigError(f"'{key}': {path} must hold a list of strings or a mapping with a 'words' list")
    return tuple(content)


@dataclass(frozen=True)
class MetadataFilter:
    """Metadata and caption thresholds; ``None`` disables a check.

    Args:
        min_size: Minimum original width and height in pixels.
        p_unsafe_threshold: Maximum ``punsafe``.
        max_pwatermark: Maximum ``pwatermark``; 1.0 or more disables the check.
        min_aesthetic: Minimum aesthetic score.
        words: Caption words or phrases that reject a sample.
        missing_field_policy: ``"drop"`` or ``"keep"`` samples whose json lacks a field a check needs.
    """

    min_size: int | None = None
    p_unsafe_threshold: float | None = None
    max_pwatermark: float | None = None
    min_aesthetic: float | None = None
    words: tuple[str, ...] = ()
    missing_field_policy: MissingFieldPolicy = "drop"
    _pattern: re.Pattern | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.missing_field_policy not in ("drop", "keep"):
            raise ValueError(f"'missing_field_policy' must be 'drop' or 'keep', got {self.missing_field_policy!r}")
        if self.words:
            words = sorted((w.strip() for w in self.words if w.strip()), key=len, reverse=True)
            alternatives = "|".join(re.escape(w) for w in words)
            object.__setattr__(self, "_pattern", re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE))

    @property
    def needs_json(self) -> bool:
        """Whether any check reads the json (a sample without json is then bad data)."""
        checks = (self.min_size, self.p_unsafe_threshold, self.watermark_limit, self.min_aesthetic)
        return any(c is not None for c in checks)

    @property
    def watermark_limit(self) -> float | None:
        # COMPAT: the reference skips the watermark check when max_pwatermark >= 1.0.
        return self.max_pwatermark if self.max_pwatermark is not None and self.max_pwatermark < 1.0 else None

    def check(self, meta: Mapping[str, Any], caption: str) -> str | None:
        """``None`` to keep the sample, else the counter name of the first failing check."""
        keep_missing = self.missing_field_policy == "keep"
        if self.min_size is not None and self.min_size > 1:
            w, h = _number(meta, "original_width"), _number(meta, "original_height")
            if w is None or h is None:
                if not keep_missing:
                    return "missing_size"
            elif w < self.min_size or h < self.min_size:
                return "too_small"
        for limit, names, missing, failed, keep_if in (
            (self.p_unsafe_threshold, ("punsafe",), "missing_punsafe", "filtered_punsafe", "le"),
            (self.watermark_limit, ("pwatermark",), "missing_watermark", "filtered_watermark", "le"),
            (self.min_aesthetic, AESTHETIC_FIELDS, "missing_aesthetic", "filtered_aesthetic", "ge"),
        ):
            if limit is None:
                continue
            value = _number(meta, *names)
            if value is None:
                if not keep_missing:
                    return missing
            elif (value > limit) if keep_if == "le" else (value < limit):
                return failed
        if self._pattern is not None and self._pattern.search(caption):
            return "filtered_words"
        return None


__all__ = ["AESTHETIC_FIELDS", "MetadataFilter", "MissingFieldPolicy", "load_word_list"]
