"""``WebDataModuleFromConfig``: LAION/img2dataset WebDataset shards as a Lightning data module (DECISIONS D7, R7).

Config targets kept from the SD configs: ``ldm.data.laion.WebDataModuleFromConfig`` and
``ldm.data.laion.AddMask`` (defined in ``ldm.data.inpainting``). Every key of the official SD2 inpainting
``data:`` section is accepted and used:

=====================  ==================================================================================
key                    meaning here
=====================  ==================================================================================
tar_base               prefix joined to each split's ``shards`` pattern; ``null`` = patterns are full URLs
batch_size             samples per batch (per process); training drops the last partial batch
num_workers            DataLoader worker processes per rank
multinode              split data across ranks; ``False`` with more than one rank is an error (as in ldm)
min_size               minimum width and height: of the json ``original_width``/``original_height`` (a cheap
                       pre-filter) and of the stored image itself (read from its header)
max_pwatermark         maximum ``pwatermark`` (1.0 disables, as in ldm)
p_unsafe_threshold     maximum ``punsafe``
filter_word_list       yaml word list; captions containing a listed word are dropped
train / validation /   per split (``ldm.data.split_config.SplitConfig``): ``shards`` (pattern or list),
test                   ``shuffle`` (sample buffer size), ``image_key``, ``image_transforms``, ``postprocess``,
                       ldm's per-key ``transforms`` and, new here, ``resampled`` (default true for train, false
                       otherwise) and ``latent_moments`` (precomputed image latents, ``ldm.data.latents``)
=====================  ==================================================================================

Batch layout (what ``LatentInpaintDiffusion.get_input`` reads): ``jpg`` B x H x W x 3 float32 in [-1, 1];
``txt`` list of B non-empty captions (``ucg_training`` replaces them in the model); ``mask`` B x H x W x 1
float32 {0, 1}, 1 = hole; ``masked_image`` = jpg * (mask < 0.5); ``json`` list of dicts; ``__key__`` and
``__url__`` lists of str. ``mask``/``masked_image`` come from the ``AddMask`` postprocess. A split that uses
precomputed latents adds ``latent_moments`` B x 2C x h x w float16; start-up refuses transforms under which the
stored latents would not belong to the delivered pixels (``ldm.data.latents``).

Rank and world size come from the attached trainer, else ``torch.distributed``, else ``RANK``/``WORLD_SIZE``;
they are resolved in the training process and handed to the workers (DECISIONS R11, spawn trap).

Exact resume (DECISIONS D15): the data module is stateful. Its ``state_dict`` holds every rank's stream
positions as of the last batch the training step consumed (gathered to rank 0, which writes the checkpoint);
``load_state_dict`` hands each rank its own, and the next ``train_dataloader()`` continues there, so a resumed
run sees the samples an uninterrupted run would, in the same order, on every rank. When the saved position does
not fit the run (another world size, worker count, seed, shuffle size or shard list), or the checkpoint has none,
the stream is reseeded by the resume step instead, and one warning line says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pytorch_lightning as pl
import torch

from ldm.config_schema import NonNegativeInt, PositiveFloat, PositiveInt, Probability, Range, check_params
from ldm.data import latents
from ldm.data.decode import SampleProcessor, finalize_batch
from ldm.data.filters import MetadataFilter, MissingFieldPolicy, load_word_list
from ldm.data.inpainting import AddMask
from ldm.data.resumable import ResumableLoader, describe_change, gather_to_rank0, stream_fingerprint
from ldm.data.rgb import ImageLimits
from ldm.data.shards import check_local_shards
from ldm.data.split_config import SplitConfig
from ldm.data.stats import SharedCounts
from ldm.data.transforms import build_image_transforms, gives_one_size
from ldm.data.webdata import ShardStream, expand_shards
from ldm.util import ConfigError, instantiate_from_config

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
STATE_VERSION = 1


@dataclass
class _Split:
    urls: list[str]
    processor: SampleProcessor
    shuffle: int
    resampled: bool
    latents: list[Path] | None = None  # the checked latent_moments.json files when precomputed latents are used


def _split_index(split: str) -> int:
    return SPLITS.index(split)


def resolve_rank(trainer: Any | None) -> tuple[int, int]:
    """(rank, world size): the trainer's if attached, else torch.distributed's, else RANK/WORLD_SIZE, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


class WebDataModuleFromConfig(pl.LightningDataModule):
    """WebDataset shards -> filtered, transformed, masked batches (see the module docstring for keys).

    Args:
        tar_base: Prefix joined to every split's shard pattern; None when patterns are full URLs.
        batch_size: Samples per batch and process (the SD2 inpainting run used 8 per GPU).
        train: Training split config (keys: ``ldm.data.split_config.SplitConfig``); None for no training loader.
        validation: Validation split config; None for no validation.
        test: Test split config; None for no test loader.
        num_workers: DataLoader workers per process for training (and evaluation unless ``val_num_workers``).
        multinode: Split the data across ranks. False with world size > 1 raises, as ldm's single-node mode.
        min_size: Minimum width and height; checked on the json ``original_width``/``original_height`` (a
            pre-filter before decoding) and on the stored image's header. None = off.
        max_pwatermark: Maximum json ``pwatermark``; 1.0 disables the check.
        p_unsafe_threshold: Maximum json ``punsafe``; None = off.
        filter_word_list: Path of a yaml word list (relative paths also resolve against the repo root), or a
            list of words; captions containing one are dropped. None = off.
        min_aesthetic: Minimum json ``aesthetic`` (or ``AESTHETIC_SCORE``); None = off.
        missing_field_policy: ``"drop"`` (count as bad data) or ``"keep"`` samples whose json lacks a field
            that an active filter needs.
        seed: Seed of every random draw of the pipeline (shards, shuffle, crops, masks).
        val_batch_size: Batch size of validation/test; defaults to ``batch_size``.
        val_num_workers: Workers of validation/test loaders; defaults to ``num_workers``.
        pin_memory: Pin batches in page-locked memory; None = only when CUDA is available.
        prefetch_factor: Batches prefetched per worker (ignored with ``num_workers`` 0).
        persistent_workers: Keep workers alive between passes (ignored with ``num_workers`` 0).
        multiprocessing_context: Worker start method (``fork``, ``spawn``, ``forkserver``); None = torch default.
        max_bad_fraction: Stop with ``BadDataError`` (naming the shard) when a worker's fraction of bad records
            exceeds this. Policy filters never count.
        bad_check_min_samples: Records a worker reads before ``max_bad_fraction`` is enforced.
        jpeg_draft: Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale before a leading Resize (faster on
            raw LAION originals; pixels differ slightly from a full-resolution resize).
        log_every_s: Seconds between each worker's log lines with its skip counts.
        uint8_transport: Workers send images and masks as uint8 (5.6x fewer bytes through shared memory,
            which dominates worker CPU time at 512 px, see docs/BENCHMARKS.md); ``on_after_batch_transfer``
            then builds the float32 batch on the training device, so a Lightning model sees the same layout.
            Loaders used outside Lightning return uint8 batches: pass them through :meth:`finalize_batch`.
        max_pixels: Largest image (width x height of the stored image, and of every planned resize of it)
            that is decoded; larger ones are skipped as ``too_large`` before decoding. None = off (PIL's own
            decompression-bomb guard still applies).
        max_aspect_ratio: Largest ``long side / short side``; more elongated images are skipped as
            ``extreme_aspect`` before decoding (a centre crop of a strip or banner shows a sliver that its
            caption does not describe, and upscaling its short side costs gigabytes). None = off.
    """

    def __init__(
        self,
        tar_base: str | None = None,
        batch_size: PositiveInt = 8,
        train: SplitConfig | Mapping[str, Any] | None = None,
        validation: SplitConfig | Mapping[str, Any] | None = None,
        test: SplitConfig | Mapping[str, Any] | None = None,
        num_workers: NonNegativeInt = 4,
        multinode: bool = True,
        min_size: NonNegativeInt | None = None,
        max_pwatermark: Probability = 1.0,
        p_unsafe_threshold: Probability | None = None,
        filter_word_list: str | list[str] | None = None,
        min_aesthetic: float | None = None,
        missing_field_policy: MissingFieldPolicy = "drop",
        seed: NonNegativeInt = 0,
        val_batch_size: PositiveInt | None = None,
        val_num_workers: NonNegativeInt | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: PositiveInt = 2,
        persistent_workers: bool = False,
        multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None,
        max_bad_fraction: Probability = 0.1,
        bad_check_min_samples: PositiveInt = 1000,
        jpeg_draft: bool = False,
        log_every_s: PositiveFloat = 300.0,
        uint8_transport: bool = False,
        max_pixels: PositiveInt | None = 50_000_000,
        max_aspect_ratio: Annotated[float, Range(1)] | None = 10.0,
    ) -> None:
        super().__init__()
        positive = {"batch_size": batch_size, "val_batch_size": val_batch_size, "prefetch_factor": prefetch_factor,
                    "bad_check_min_samples": bad_check_min_samples, "max_pixels": max_pixels}
        for name, value in positive.items():
            if value is not None and int(value) < 1:
                raise ConfigError(f"'{name}' must be a positive integer, got {value}")
        if num_workers < 0 or (val_num_workers or 0) < 0:
            raise ConfigError(f"'num_workers'/'val_num_workers' must be >= 0, got {num_workers}/{val_num_workers}")
        if max_aspect_ratio is not None and max_aspect_ratio < 1.0:
            raise ConfigError(f"'max_aspect_ratio' must be >= 1 (long side / short side), got {max_aspect_ratio}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"'max_bad_fraction' must be in [0, 1], got {max_bad_fraction}")
        if seed < 0:
            raise ConfigError(f"'seed' must be >= 0, got {seed}")
        self.tar_base, self.batch_size, self.num_workers, self.multinode = tar_base, batch_size, num_workers, multinode
        self.seed, self.val_batch_size = seed, batch_size if val_batch_size is None else val_batch_size
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor, self.persistent_workers = prefetch_factor, persistent_workers
        self.multiprocessing_context = multiprocessing_context
        self.max_bad_fraction, self.bad_check_min_samples = max_bad_fraction, bad_check_min_samples
        self.jpeg_draft, self.log_every_s, self.uint8_transport = jpeg_draft, log_every_s, uint8_transport
        self.metadata_filter = MetadataFilter(
            min_size=min_size, p_unsafe_threshold=p_unsafe_threshold, max_pwatermark=max_pwatermark,
            min_aesthetic=min_aesthetic, words=load_word_list(filter_word_list),
            missing_field_policy=missing_field_policy,
        )
        self.limits = ImageLimits(min_size=min_size if min_size and min_size > 1 else None, max_pixels=max_pixels,
                                  max_aspect_ratio=max_aspect_ratio)
        self._patterns: dict[str, Any] = {}
        self.splits = {name: self._parse_split(name, cfg) for name, cfg in
                       (("train", train), ("validation", validation), ("test", test)) if cfg is not None}
        self.counts: dict[str, SharedCounts] = {}
        self._resume_step: int | None = None
        self._loaders: dict[str, tuple[ResumableLoader, dict[str, Any], int]] = {}  # loader, fingerprint, seed step
        self._restored: dict[str, Any] | None = None  # this rank's saved positions, by split

    def _parse_split(self, name: str, cfg: SplitConfig | Mapping[str, Any]) -> _Split:
        if isinstance(cfg, Mapping):
            check_params(SplitConfig, cfg, name, complete=True)  # a config has been checked with its full path
            cfg = SplitConfig(**cfg)
        elif not isinstance(cfg, SplitConfig):
            raise ConfigError(f"'{name}' must be a mapping of split options, got {type(cfg).__name__}")
        key_transforms = dict(cfg.transforms or {})
        if cfg.image_key in key_transforms:
            raise ConfigError(f"must not name the image key '{cfg.image_key}'; use 'image_transforms' for the image",
                              key=f"{name}.transforms")
        if cfg.shuffle < 0:
            raise ConfigError(f"must be >= 0, got {cfg.shuffle}", key=f"{name}.shuffle")
        image_ops = build_image_transforms(cfg.image_transforms, where=name)
        batch = self.batch_size if name == "train" else self.val_batch_size
        if batch > 1 and gives_one_size(image_ops) is False:  # else the first mixed batch stops the run, hours in
            log.warning("data.params.%s.image_transforms: no crop after the last Resize, so images keep their "
                        "stored aspect ratios and a batch of two shapes stops the run; end the list with a "
                        "RandomCrop or CenterCrop (fine as is only if every stored image has one size)", name)
        urls = expand_shards(cfg.shards, self.tar_base, where=f"{name}.shards")
        sidecars = latents.resolve(cfg.latent_moments, urls, image_ops, cfg.image_key, self.jpeg_draft, name)
        processor = SampleProcessor(
            image_key=cfg.image_key,
            metadata_filter=self.metadata_filter,
            image_ops=image_ops,
            postprocess=instantiate_from_config(cfg.postprocess) if cfg.postprocess is not None else None,
            key_transforms={k: instantiate_from_config(v) for k, v in key_transforms.items()},
            jpeg_draft=self.jpeg_draft,
            uint8_images=self.uint8_transport,
            limits=self.limits,
            use_latents=sidecars is not None,
            warn_unused_latents=sidecars is None and cfg.latent_moments is not False,
        )
        if sidecars is not None:
            log.info("data %s: precomputed image latents (checked against %s); images are not VAE-encoded, masked "
                     "images still are", name, ", ".join(str(p) for p in sidecars[:2]))
        self._patterns[name] = cfg.shards
        resampled = name == "train" if cfg.resampled is None else cfg.resampled
        return _Split(urls, processor, cfg.shuffle, resampled, sidecars)

    @property
    def latent_sidecars(self) -> dict[str, list[Path]]:
        """Split -> the ``latent_moments.json`` files its precomputed latents were checked against (used splits)."""
        return {name: s.latents for name, s in self.splits.items() if s.latents is not None}

    def check_local_shards(self, split: str) -> None:
        """Fail fast when none of a split's local shard files exist (see :func:`ldm.data.shards.check_local_shards`)."""
        check_local_shards(self.splits[split].urls, self._patterns.get(split), f"data.params.{split}.shards")

    def set_resume_step(self, step: int) -> None:
        """Seed the next training stream with this global step, ignoring any restored position."""
        if step < 0:
            raise ValueError(f"set_resume_step: step must be >= 0, got {step}")
        self._resume_step = int(step)

    def _resume_plan(self, split: str, fingerprint: dict[str, Any], rank: int) -> tuple[int, dict | None]:
        """(seed step of the stream, saved position to continue from or None); one warning line on a reseed."""
        step = self.trainer.global_step if self.trainer is not None else 0
        if split == "train" and self._resume_step is not None:
            return self._resume_step, None
        saved = (self._restored or {}).pop(split, None)
        if saved is not None and saved.get("fingerprint") == fingerprint:
            return int(saved["resume_step"]), saved["position"]
        if split != "train":
            return 0, None
        why = None
        if saved is not None:
            change = describe_change(saved["fingerprint"], fingerprint)
            why = f"the checkpoint's {split} stream position was saved with {change}"
        elif step > 0:
            why = f"the checkpoint holds no {split} stream position (older code, or another data module)"
        if why is not None and rank == 0:
            log.warning("data: %s; continuing with a new stream seeded by step %d (not sample-exact, see "
                        "docs/DECISIONS.md D15)", why, step)
        return step, None

    def _loader(self, split: str) -> ResumableLoader:
        if split not in self.splits:
            raise ConfigError(f"no '{split}' split configured in the data module (add a '{split}:' section)")
        spec = self.splits[split]
        self.check_local_shards(split)
        rank, world_size = resolve_rank(self.trainer)
        if world_size > 1 and not self.multinode:
            raise ConfigError(f"'multinode' is False but the world size is {world_size}; set multinode: True")
        train = split == "train"
        workers = self.num_workers if train else self.val_num_workers
        if not spec.resampled and len(spec.urls) < world_size * max(1, workers):
            log.warning("%s: %d shards for %d ranks x %d workers; some readers get no shard%s", split,
                        len(spec.urls), world_size, max(1, workers),
                        " and a rank with no data can stall collectives" if len(spec.urls) < world_size else "")
        self.counts[split] = SharedCounts(max(1, workers))

        def stream(resume_step: int, fallback_step: int | None = None) -> ShardStream:
            return ShardStream(
                spec.urls, spec.processor, split=split, batch_size=self.batch_size if train else self.val_batch_size,
                partial=not train, resampled=spec.resampled, shuffle=spec.shuffle, seed=self.seed,
                counts=self.counts[split], rank=rank, world_size=world_size, resume_step=resume_step,
                max_bad_fraction=self.max_bad_fraction, bad_check_min_samples=self.bad_check_min_samples,
                log_every_s=self.log_every_s, fallback_step=fallback_step)

        fingerprint = stream_fingerprint(stream(0), workers)
        resume_step, position = self._resume_plan(split, fingerprint, rank)
        dataset = stream(resume_step, self.trainer.global_step if self.trainer is not None else resume_step)
        # The DataLoader draws its workers' base seed from this generator instead of torch's global RNG, so
        # loading leaves global state alone and unseeded ``External`` transforms still repeat run to run.
        generator = torch.Generator().manual_seed(self.seed * 4 + _split_index(split))
        loader = ResumableLoader(dataset, num_workers=workers, pin_memory=self.pin_memory, generator=generator,
                                 prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers,
                                 multiprocessing_context=self.multiprocessing_context)
        if position is not None:
            loader.restore(position)
        self._loaders[split] = (loader, fingerprint, resume_step)
        log.info("%s loader: %d shard URLs, rank %d/%d, %d workers, resampled=%s, shuffle=%d, seed=%d, step=%d%s",
                 split, len(spec.urls), rank, world_size, workers, spec.resampled, spec.shuffle, self.seed,
                 resume_step, ", continuing from the saved position" if position is not None else "")
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream positions (rank 0 writes the checkpoint, so they are gathered there).

        Lightning calls this on every rank while it dumps a checkpoint; it is a collective. Inside a trainer the
        training position is that of the last batch the step consumed (not of the batch Lightning has
        prefetched), and an evaluation loader's is the start of its next pass.
        """
        local = {}
        for split, (loader, fingerprint, resume_step) in self._loaders.items():
            if self.trainer is None:  # iterated by hand: the position after the last batch handed out
                position = loader.snapshot()
            elif split == "train":
                position = loader.snapshot(loader.consumed)
            else:  # Lightning runs every validation/test pass whole and starts the next one afresh
                position = loader.next_pass()
            local[split] = {"fingerprint": fingerprint, "resume_step": resume_step, "position": position}
        ranks = gather_to_rank0(local)
        return {} if ranks is None else {"version": STATE_VERSION, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's saved positions for the next ``*_dataloader()`` calls (see :meth:`state_dict`)."""
        ranks = state_dict.get("ranks") or []
        if state_dict.get("version") != STATE_VERSION or not ranks:
            self._restored = {}
            return
        rank, _ = resolve_rank(self.trainer)
        # Another world size fails the fingerprint check; a rank beyond the saved ones reports the difference.
        self._restored = dict(ranks[min(rank, len(ranks) - 1)])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:  # noqa: ARG002 (Lightning hook)
        # Lightning calls this once per batch the loop consumes (its fetcher pulls one batch ahead of that).
        trainer = self.trainer
        if trainer is not None:
            split = ("train" if trainer.training else "test" if trainer.testing
                     else "validation" if trainer.validating or trainer.sanity_checking else None)
            if split in self._loaders:
                self._loaders[split][0].mark_consumed()
        return batch

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train")

    def val_dataloader(self) -> ResumableLoader | list:
        # No validation split: an empty list tells Lightning to skip validation.
        return self._loader("validation") if "validation" in self.splits else []

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test")

    def finalize_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Convert a uint8-transport batch to the model's float32 layout (no-op for float batches)."""
        for image_key in {s.processor.image_key for s in self.splits.values()}:
            finalize_batch(batch, image_key)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:  # noqa: ARG002 (Lightning hook)
        # Lightning calls this after moving the batch to the device: the float conversion runs there.
        return self.finalize_batch(batch) if isinstance(batch, dict) else batch

    def data_stats(self, split: str = "train") -> dict[str, int]:
        """Live counts of delivered and skipped samples of ``split`` in this process (all its workers)."""
        if split not in self.counts:
            return {}
        return self.counts[split].totals()

    def log_data_stats(self) -> None:
        """Log the non-zero counts of every split that has a loader."""
        for split in self.counts:
            log.info("data %s: %s", split, {k: v for k, v in self.data_stats(split).items() if v})


__all__ = ["AddMask", "WebDataModuleFromConfig", "resolve_rank"]
