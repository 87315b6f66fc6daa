"""Seed derivation for the data pipeline: every random draw has a named, reproducible origin.

The pipeline never touches global RNG state (``random``, ``np.random``, ``torch``). Instead each random
decision gets its own ``numpy.random.Generator`` built from a tuple of integers ("seed words"):

* worker streams (which shard next, the shuffle buffer): ``(seed, split, resume_step, epoch, rank, worker)``,
  where ``resume_step`` is 0 for a new run and stays 0 through exact resumes; a resume without a usable saved
  position reseeds the stream with its global step;
* per-sample streams (crop offset, mask, p_drop): the worker words plus the sample's index in that worker's
  stream, or, for evaluation splits, ``(seed, split, hash(shard name, sample key))`` so a validation sample
  gets the same crop and mask whatever the number of ranks and workers.

The words travel with a sample under the private key ``__seed__`` (dropped before collation); postprocessors
such as :class:`ldm.data.inpainting.AddMask` turn them into a generator with :func:`sample_rng`. A trailing
*stream* word keeps the crop, the mask and any future draw statistically independent of one another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any

import numpy as np

SEED_KEY = "__seed__"


class Stream(IntEnum):
    """Independent sub-streams derived from one set of seed words."""

    SHARDS = 0
    SHUFFLE = 1
    CROP = 2
    MASK = 3
    TRANSFORM = 4


SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def split_id(split: str) -> int:
    try:
        return SPLIT_IDS[split]
    except KeyError:
        raise ValueError(f"unknown split '{split}'; expected one of {list(SPLIT_IDS)}") from None


def make_rng(words: Sequence[int], stream: Stream) -> np.random.Generator:
    """A generator for ``stream`` from non-negative integer seed words (numpy ``SeedSequence`` entropy)."""
    return np.random.default_rng([*(int(w) for w in words), int(stream)])


def stable_hash(text: str) -> int:
    """A 63-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def sample_rng(sample: Mapping[str, Any], stream: Stream) -> np.random.Generator | None:
    """The generator for ``stream`` of a pipeline sample, or None when the sample carries no seed words."""
    words = sample.get(SEED_KEY)
    return None if words is None else make_rng(words, stream)


__all__ = ["SEED_KEY", "SPLIT_IDS", "Stream", "make_rng", "sample_rng", "split_id", "stable_hash"]
