#!/usr/bin/env python
"""``make demo``: the whole SD2 inpainting mission in miniature, on CPU. It proves the pipeline, not quality.

Every stage is the real entry point a cluster user runs (called in-process: same code, no interpreter
restarts):

1. ``scripts/make_shards.py --demo``: WebDataset shards of the training photos at 64 px; two more photos are
   held out (never trained on) and written, with the held-in ones, as folders of NAME.png / NAME_mask.png /
   NAME.txt;
2. ``main.py --base configs/demo/autoencoder.yaml --train``: a tiny AutoencoderKL (reconstruction + KL);
3. ``main.py --base configs/demo/base.yaml --train``: a tiny 4-channel text-to-image LatentDiffusion;
4. ``main.py --base configs/demo/inpaint.yaml --train``: the 9-channel inpainting fine-tune of that base
   (zero-init extra channels, LaMa-style masks on the fly, v-objective, EMA), after checking that at step 0 it
   reproduces the base;
5. ``scripts/evaluate.py`` on the held-in and the held-out photos with fixed masks: the fine-tuned model
   against the step-0 model, an untrained UNet, OpenCV's classical inpainting and a mean-colour fill;
6. ``scripts/inpaint.py`` on the held-out photos, raw and with ``--paste-back``;
7. loss plots, labelled grids, ``report.md`` (which comparisons the model wins and loses) and ``metrics.json``.

Every training stage logs its loss on fixed batches (held-in and held-out photos, fixed masks, timesteps and
noise: ``ldm.fixed_batch.FixedBatchLoss``), so the plots show learning without the noise of random draws.

A second run reuses every finished stage (``--restart`` redoes them all; an interrupted stage starts again). Each
stage prints its estimated time on one idle core. Torch uses one thread unless ``--threads`` says otherwise.

Outputs under ``--out``: ``report.md``, ``inpainting_grid.png``, ``paste_back_grid.png``, ``plots/``,
``metrics.json``, ``checkpoints/``, ``runs/`` (main.py run directories), ``eval/{heldin,heldout}/``. ``--fast``:
the shorter run the test suite uses; ``--steps N``: N training steps per stage (10: a smoke run). Exit status 1
when the model did not reach the learning criterion (see report.md), 2 when a stage failed.

    python scripts/demo.py --out demo_out          # what `make demo` runs
    python scripts/demo.py --out /tmp/demo --fast  # the CI-sized run
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: with --images: the fraction of the user's photos held out (at least one)
USER_HELDOUT_FRACTION = 0.2
#: photos per split written to the held-in / held-out folders (evaluation, fixed batches, grids)
EVAL_IMAGES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--outdir", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--fast", action="store_true", help="the shortened CI run (fewer photos and steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every stage (overrides the profile; e.g. 10 for a smoke run)")
    p.add_argument("--images", type=Path, default=None,
                   help="your own photos instead of the embedded ones: a folder with a caption NAME.txt next to "
                        f"each image (or --captions); {round(USER_HELDOUT_FRACTION * 100)}%% of them are held out")
    p.add_argument("--captions", type=Path, default=None, help="caption table for --images (see make_shards.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared or 2-core machine more threads rarely help)")
    p.add_argument("--restart", action="store_true", help="redo every stage instead of reusing finished ones")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.captions is not None and args.images is None:
        p.error("--captions goes with --images")
    if args.images is not None and not args.images.is_dir():
        p.error(f"--images {args.images}: not a folder")
    if args.images is not None and args.images.resolve() in (args.out.resolve(), *args.out.resolve().parents):
        p.error(f"--out {args.out} is inside --images {args.images} (read recursively); choose a folder outside it")
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below

import demo_plots as plots  # noqa: E402 - sibling module in scripts/
import demo_report as report  # noqa: E402 - sibling module in scripts/
import torch  # noqa: E402
from demo_data import DEMO_MANIFEST, HELDOUT, shard_names, split_manifest, write_folder  # noqa: E402, F401 - sibling

from ldm.checkpoint import load_checkpoint_file  # noqa: E402
from ldm.fixed_batch import folder_batch  # noqa: E402
from ldm.inference import load_model  # noqa: E402
from ldm.quiet import silence_known_noise  # noqa: E402
from ldm.util import load_config  # noqa: E402

log = logging.getLogger("demo")

CONFIGS = {name: f"configs/demo/{name}.yaml" for name in ("autoencoder", "base", "inpaint")}
SIZE = 64
SPLITS = ("heldin", "heldout")
#: evaluation masks: LaMa's thick/medium presets in 256 px pixel numbers on 64 px ("@64", DECISIONS D6): ~30-35%
#: holes, several 8 px latent cells wide (thinner ones measure the autoencoder). Grids and fixed batches: the first.
EVAL_MASKS = ("lama-thick-256@64", "lama-medium-256@64")
#: bump when a stage's outputs change meaning, so that older cached stages are redone
CACHE_VERSION = 3
#: known-noisy third-party warnings that tell a demo user nothing (CPU, no workers, streaming dataset)
QUIET_WARNINGS = (r".*infer the `batch_size`.*", r".*does not have many workers.*",
                  r".*GPU available but not used.*", r".*sync_dist=True.*")
#: measured CPU seconds per unit with one thread (metrics.json's cpu_seconds of a --fast run): a training step of
#: each stage, one 25-step sampled image of evaluate.py / inpaint.py, and loading overheads
SECONDS = {"autoencoder_step": 0.33, "base_step": 0.19, "inpaint_step": 0.27, "sample": 0.25, "stage_overhead": 2.0}


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo run.

    Args:
        autoencoder_steps: optimizer steps of stage 2.
        base_steps: optimizer steps of stage 3.
        inpaint_steps: optimizer steps of stage 4.
        sampler_steps: DDIM steps of stages 5 and 6.
        guidance_scale: classifier-free guidance scale of stages 5 and 6.
        train_photos: train on the first this many non-held-out photos of the manifest (None = all eight).
        autoencoder_batch_size: stage-2 batch size (None = the config's 8). Smaller batches, more steps:
            on CPU the autoencoder memorises the photos faster per second that way.
        fixed_batch_every: optimizer steps between two fixed-batch loss evaluations.
        eval_mask_presets: how many of ``EVAL_MASKS`` the evaluation uses (each photo is scored under each).
    """

    autoencoder_steps: int
    base_steps: int
    inpaint_steps: int
    sampler_steps: int = 25
    guidance_scale: float = 2.0
    train_photos: int | None = None
    autoencoder_batch_size: int | None = None
    fixed_batch_every: int = 25
    eval_mask_presets: int = 2


PROFILES = {
    "full": Profile(autoencoder_steps=800, base_steps=500, inpaint_steps=500, autoencoder_batch_size=4),
    # CI: the same pipeline on 4 training photos, so that memorising them takes fewer steps
    "fast": Profile(autoencoder_steps=320, base_steps=150, inpaint_steps=150, sampler_steps=10, train_photos=4,
                    autoencoder_batch_size=4, fixed_batch_every=30, eval_mask_presets=1),
}


class DemoError(RuntimeError):
    """A stage failed; the message names it (its own log lines above say why)."""


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def call(what: str, entry: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run an entry point's ``main(argv)``, logging the equivalent command line; non-zero status raises."""
    log.info("$ python %s %s", what, " ".join(argv))
    status = entry(argv)
    if status:
        raise DemoError(f"{what} exited with status {status}")


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts (profile, configs, upstream fingerprints): a stage's cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """One stage: ``run()`` returns a JSON-able record (paths it wrote under ``out``); ``inputs`` is what its
    result depends on besides the stages before it; ``estimate_s`` its time on one idle core."""

    name: str
    title: str
    run: Callable[[], dict[str, Any]]
    inputs: Any
    estimate_s: float
    cached: bool = True


class Demo:
    """The stages of one demo run; each writes under ``out`` and records what it produced in ``metrics``."""

    def __init__(self, out: Path, profile: Profile, seed: int, images: Path | None = None,
                 captions: Path | None = None) -> None:
        self.out, self.profile, self.seed = out, profile, seed
        self.images, self.captions = images, captions
        self.masks = EVAL_MASKS[: profile.eval_mask_presets]
        self.shards = out / "shards" / "{00000..00000}.tar"
        self.folders = {split: out / split for split in SPLITS}
        self.ckpt = {n: out / "checkpoints" / f"{n}.ckpt" for n in ("autoencoder", "base", "inpaint", "step0",
                                                                      "untrained_unet")}
        self.ckpt["finetuned"] = self.ckpt["inpaint"]  # the evaluation's name for the fine-tuned model
        self.records: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, Any] = {"profile": asdict(profile), "seed": seed, "seconds": {}, "cpu_seconds": {},
                                        "reused": []}

    # ------------------------------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        p, sec = self.profile, SECONDS
        config_text = {name: (REPO / path).read_text(encoding="utf-8") for name, path in CONFIGS.items()}
        samples = 3 * len(self.masks) * (min(p.train_photos or 8, EVAL_IMAGES) + len(HELDOUT))  # evaluate.py
        return [
            Stage("data", "build shards of the training photos and the held-in / held-out folders", self.make_data,
                  [self.data_identity(), SIZE, EVAL_MASKS[0], EVAL_IMAGES], 2.0),
            Stage("autoencoder", "train the autoencoder", self.train_autoencoder,
                  [config_text["autoencoder"], p.autoencoder_steps, p.autoencoder_batch_size,
                   p.fixed_batch_every], p.autoencoder_steps * sec["autoencoder_step"] + sec["stage_overhead"]),
            Stage("base", "train the text-to-image base", self.train_base,
                  [config_text["base"], p.base_steps, p.fixed_batch_every],
                  p.base_steps * sec["base_step"] + sec["stage_overhead"]),
            Stage("inpaint", "fine-tune the 9-channel inpainting model from the base", self.finetune_inpaint,
                  [config_text["inpaint"], p.inpaint_steps, p.fixed_batch_every],
                  p.inpaint_steps * sec["inpaint_step"] + 2 * sec["stage_overhead"]),
            Stage("evaluate", "evaluate held-in and held-out photos against the baselines", self.evaluate,
                  [p.sampler_steps, p.guidance_scale, self.masks, report.OPENCV_RADIUS],
                  samples * sec["sample"] * p.sampler_steps / 25 + 2 * sec["stage_overhead"]),
            Stage("inpaint_script", "inpaint the held-out photos with scripts/inpaint.py, raw and pasted back",
                  self.inpaint_heldout, [p.sampler_steps, p.guidance_scale],
                  2 * len(HELDOUT) * sec["sample"] * p.sampler_steps / 25 + 2 * sec["stage_overhead"]),
            Stage("report", "write report.md, loss plots, grids and metrics.json", self.report, [], 3.0,
                  cached=False),
        ]

    def data_identity(self) -> Any:
        """What the data stage reads: the manifest and split, or every file of --images (name, size, mtime)."""
        if self.images is None:
            return [DEMO_MANIFEST.read_text(encoding="utf-8"), HELDOUT, self.profile.train_photos]
        files = [self.images / f for f in sorted(p.relative_to(self.images) for p in self.images.rglob("*"))]
        files += [self.captions] if self.captions else []
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]

    def make_data(self) -> dict[str, Any]:
        """Training shards (``shards/``) and held-out shards (``heldout_shards/``), then the two folders."""
        for d in ("shards", "heldout_shards", "split"):
            shutil.rmtree(self.out / d, ignore_errors=True)
        if self.images is not None:
            record = self.split_user_images()
        else:
            record = self.split_demo_photos()
        for split, shard_dir in (("heldin", "shards"), ("heldout", "heldout_shards")):
            write_folder(self.out / shard_dir, self.folders[split], SIZE, EVAL_MASKS[0], EVAL_IMAGES, self.seed)
        return record

    def split_demo_photos(self) -> dict[str, Any]:
        manifests = split_manifest(DEMO_MANIFEST, HELDOUT, self.profile.train_photos, self.out / "manifests")
        for split, manifest in manifests.items():
            shard_dir = self.out / ("shards" if split == "train" else "heldout_shards")
            call("scripts/make_shards.py", load_script("make_shards").main, [
                "--demo", "--manifest", str(manifest), "--augment", "none", "--samples-per-shard", "100000",
                *self.shard_args(shard_dir)])
        return {"manifests": {k: str(v) for k, v in manifests.items()}, "heldout_photos": list(HELDOUT)}

    def split_user_images(self) -> dict[str, Any]:
        """``--images``: make_shards.py holds out a seeded fraction of the folder's images."""
        call("scripts/make_shards.py", load_script("make_shards").main, [
            "--images", str(self.images), *(["--captions", str(self.captions)] if self.captions else []),
            "--val-fraction", str(USER_HELDOUT_FRACTION), "--samples-per-shard", "100000",
            *self.shard_args(self.out / "split")])
        os.replace(self.out / "split" / "train", self.out / "shards")
        os.replace(self.out / "split" / "val", self.out / "heldout_shards")
        return {"images": str(self.images), "heldout_fraction": USER_HELDOUT_FRACTION}

    def shard_args(self, out: Path) -> list[str]:
        return ["--size", str(SIZE), "--resize-mode", "center_crop", "--seed", str(self.seed), "--out", str(out)]

    def train(self, name: str, steps: int, overrides: Sequence[str]) -> dict[str, Any]:
        """``main.py --base configs/demo/<name>.yaml --train``; its last.ckpt -> checkpoints/<name>.ckpt."""
        import main as ldm_main

        runs = self.out / "runs"
        before = set(runs.glob(f"*_demo-{name}"))
        every = self.profile.fixed_batch_every
        call("main.py", ldm_main.main, [
            "--base", CONFIGS[name], "--train", "-l", str(runs), "-n", f"demo-{name}", "-s", str(self.seed),
            f"data.params.train.shards={self.shards}", f"lightning.trainer.max_steps={steps}",
            f"lightning.modelcheckpoint.params.every_n_train_steps={steps}",
            *(f"lightning.callbacks.fixed_batch_loss.params.folders.{s}={self.folders[s]}" for s in SPLITS),
            f"lightning.callbacks.fixed_batch_loss.params.every_n_train_steps={every}", *overrides])
        new = sorted(set(runs.glob(f"*_demo-{name}")) - before)
        last = new[-1] / "checkpoints" / "last.ckpt" if new else None
        if last is None or not last.is_file():
            raise DemoError(f"main.py wrote no checkpoints/last.ckpt under {runs} for {name}")
        step = load_checkpoint_file(last).get("global_step")
        # main.py returns 0 after a SIGTERM/SIGUSR1 save-and-stop: do not go on with a half-trained model
        if step != steps:
            raise DemoError(f"{name} stopped at step {step} of {steps} (interrupted?); run the demo again")
        self.ckpt[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(last, self.ckpt[name])
        return {"run": str(new[-1]), "checkpoint": str(self.ckpt[name])}

    def train_autoencoder(self) -> dict[str, Any]:
        batch = self.profile.autoencoder_batch_size
        return self.train("autoencoder", self.profile.autoencoder_steps,
                          [f"data.params.batch_size={batch}"] if batch else [])

    def train_base(self) -> dict[str, Any]:
        return self.train("base", self.profile.base_steps,
                          [f"model.params.first_stage_config.params.ckpt_path={self.ckpt['autoencoder']}"])

    def finetune_inpaint(self) -> dict[str, Any]:
        overrides = [f"model.params.ckpt_path={self.ckpt['base']}"]
        check = self.check_start_from_base(overrides)
        record = self.train("inpaint", self.profile.inpaint_steps, overrides)
        return {**record, "start_from_base": check, "step0_checkpoint": str(self.ckpt["step0"])}

    def check_start_from_base(self, overrides: list[str]) -> dict[str, Any]:
        """Step 0 of the fine-tune equals the base, and starts far below a random 9-channel UNet; the step-0
        model is saved as checkpoints/step0.ckpt (a baseline of the evaluation)."""
        cfg = load_config([CONFIGS["inpaint"]], overrides)
        step0 = report.build_step0(cfg)
        base = load_model(CONFIGS["base"], self.ckpt["base"], use_ema=False, device="cpu").model
        batch = folder_batch(self.folders["heldin"], repeats=4)
        check = report.start_from_base_check(step0, base, self.ckpt["base"], batch,
                                             cfg.model.params.unet_config, self.seed)
        report.save_model_checkpoint(step0, self.ckpt["step0"])
        log.info("step 0: max |inpaint UNet - base UNet| = %.2e (outputs ~%.2f); EMA widened exactly: %s",
                 check.max_abs_diff, check.base_output_scale, check.ema_widened_exactly)
        log.info("step 0: loss %.4f from the base vs %.4f for a random 9-channel UNet (ratio %.3f)",
                 check.loss_from_base, check.loss_random_unet, check.loss_ratio)
        return report.start_check_dict(check)

    def evaluate(self) -> dict[str, Any]:
        """evaluate.py on each split (fine-tuned, step-0, untrained UNet), then the non-learned baselines."""
        report.untrained_unet_checkpoint(
            self.ckpt["inpaint"], load_config([CONFIGS["inpaint"]]).model.params.unet_config, "hybrid",
            self.ckpt["untrained_unet"], self.seed)
        results = {}
        for split in SPLITS:
            eval_dir = self.out / "eval" / split
            shutil.rmtree(eval_dir, ignore_errors=True)
            call("scripts/evaluate.py", load_script("evaluate").main, [
                "--config", CONFIGS["inpaint"], "--images", str(self.folders[split]), "--size", str(SIZE),
                *(arg for m in ("finetuned", *report.MODEL_BASELINES) for arg in ("--ckpt", f"{m}={self.ckpt[m]}")),
                "--masks", *self.masks, "--out", str(eval_dir), "--seed", str(self.seed), *self.sampling_args()])
            by_method = {m: json.loads((eval_dir / f"{m}.json").read_text())
                         for m in ("finetuned", *report.MODEL_BASELINES)}
            keys = sorted({s["key"] for s in by_method["finetuned"]["samples"]})
            for name in report.FILLS:
                by_method[name] = report.fill_scores(eval_dir, name, keys, self.masks)
                (eval_dir / f"{name}.json").write_text(json.dumps(by_method[name], indent=2) + "\n")
            results[split] = {m: r["groups"] for m, r in by_method.items()}
        return {"evaluation": results}

    def inpaint_heldout(self) -> dict[str, Any]:
        """The user's command on photos the model never saw: raw output, and with the known pixels pasted back."""
        folder = self.folders["heldout"]
        for kind, extra in (("raw", []), ("paste_back", ["--paste-back"])):
            out = self.out / "samples" / kind
            shutil.rmtree(out, ignore_errors=True)
            call("scripts/inpaint.py", load_script("inpaint").main, [
                "--config", CONFIGS["inpaint"], "--ckpt", str(self.ckpt["inpaint"]), "--input-dir", str(folder),
                "--prompts-file", str(self.write_prompts(folder)), "--out", str(out), "--seed", str(self.seed),
                *self.sampling_args(), *extra])
        return {"samples": str(self.out / "samples")}

    @staticmethod
    def write_prompts(folder: Path) -> Path:
        """prompts.txt: one caption per line in the sorted order in which inpaint.py pairs the images."""
        names = sorted(p.stem for p in folder.glob("*.png") if not p.stem.endswith("_mask"))
        path = folder.parent / f"{folder.name}_prompts.txt"
        path.write_text("".join((folder / f"{n}.txt").read_text(encoding="utf-8") for n in names), encoding="utf-8")
        return path

    def sampling_args(self) -> list[str]:
        return ["--steps", str(self.profile.sampler_steps), "--scale", str(self.profile.guidance_scale),
                "--device", "cpu"]

    def report(self) -> dict[str, Any]:
        """Loss plots, grids, report.md and the verdict."""
        stage_plots = {
            "autoencoder": ("train/rec_loss", "L1 reconstruction error", "autoencoder"),
            "base": ("train/loss_simple", "v-prediction MSE", "text-to-image base"),
            "inpaint": ("train/loss_simple", "v-prediction MSE", "inpainting fine-tune"),
        }
        for name, (key, ylabel, title) in stage_plots.items():
            plots.plot_stage(Path(self.records[name]["run"]) / "csv" / "version_0" / "metrics.csv", key, ylabel,
                             f"{title}: training loss and fixed-batch loss", self.out / "plots" / f"{name}_loss.png")
        results = {split: {m: json.loads((self.out / "eval" / split / f"{m}.json").read_text())
                           for m in ("finetuned", *report.MODEL_BASELINES, *report.FILLS)} for split in SPLITS}
        comparison = report.compare(results)
        fixed = {name: [v for _, v in plots.read_metrics_csv(Path(self.records[name]["run"]) / "csv" / "version_0"
                                                             / "metrics.csv")["fixed_batch/heldin"]]
                 for name in stage_plots}
        gate = report.verdict(comparison, fixed)
        (self.out / "report.md").write_text(report.report_markdown(comparison, gate), encoding="utf-8")
        plots.method_grid({s: self.out / "eval" / s for s in SPLITS}, EVAL_MASKS[0], self.out / "inpainting_grid.png")
        plots.paste_back_grid(self.folders["heldout"], self.out / "samples", self.seed,
                              self.out / "paste_back_grid.png")
        return {"comparison": comparison, "learning": gate}


# ------------------------------------------------------------------------------------------------ running
def run(demo: Demo, restart: bool) -> bool:
    """Run (or reuse) every stage under a header with its estimate; returns the learning verdict."""
    stages = demo.stages()
    cache_dir = demo.out / "stages"
    cache_dir.mkdir(parents=True, exist_ok=True)
    upstream = fingerprint(CACHE_VERSION, demo.seed)
    total = sum(s.estimate_s for s in stages)
    log.info("estimated time on one idle core: %.1f min in all (finished stages are reused)", total / 60)
    for i, stage in enumerate(stages, 1):
        upstream = key = fingerprint(upstream, stage.name, stage.inputs)
        marker = cache_dir / f"{stage.name}.json"
        log.info("=" * 100)
        cached = json.loads(marker.read_text()) if marker.is_file() and stage.cached and not restart else None
        if cached and cached.get("key") == key and all(Path(p).exists() for p in cached.get("paths", [])):
            log.info("stage %d/%d: %s -- finished earlier, reused (%s)", i, len(stages), stage.title, marker)
            demo.records[stage.name] = cached["record"]
            demo.metrics["reused"].append(stage.name)
            continue
        log.info("stage %d/%d: %s (estimated %s)", i, len(stages), stage.title, _minutes(stage.estimate_s))
        log.info("=" * 100)
        marker.unlink(missing_ok=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        record = stage.run()
        seconds = round(time.perf_counter() - start, 1)
        cpu = round(time.process_time() - cpu_start, 1)  # what an idle machine would take, near enough
        demo.records[stage.name] = record
        demo.metrics["seconds"][stage.name] = seconds
        demo.metrics["cpu_seconds"][stage.name] = cpu
        log.info("stage %d/%d done in %s (CPU time %s)", i, len(stages), _minutes(seconds), _minutes(cpu))
        paths = [v for v in record.values() if isinstance(v, str) and v.startswith(str(demo.out))]
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": seconds, "paths": paths, "record": record}, indent=2))
        os.replace(tmp, marker)  # atomic: a marker exists only for a finished stage
    demo.metrics.update({name: rec for name, rec in demo.records.items() if name not in ("report",)})
    demo.metrics.update(demo.records["report"])
    (demo.out / "metrics.json").write_text(json.dumps(demo.metrics, indent=2) + "\n")
    return bool(demo.records["report"]["learning"]["passed"])


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def summary(demo: Demo, passed: bool) -> None:
    out = demo.out
    seconds = sum(demo.metrics["seconds"].values())
    log.info("demo finished in %s (%d stage(s) reused); outputs in %s/", _minutes(seconds),
             len(demo.metrics["reused"]), out)
    for line in (out / "report.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(("- **", "Learning criterion")):
            log.info("%s", line.replace("**", ""))
    log.info("  see %s, %s (every method), %s (raw vs --paste-back), %s/*_loss.png", out / "report.md",
             out / "inpainting_grid.png", out / "paste_back_grid.png", out / "plots")
    if not passed:
        log.error("the fine-tuned model did not reach the learning criterion; see %s", out / "report.md")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    cwd = Path.cwd()
    out = args.out if args.out.is_absolute() else cwd / args.out
    profile = PROFILES["fast" if args.fast else "full"]
    if args.steps is not None:
        profile = replace(profile, autoencoder_steps=args.steps, base_steps=args.steps, inpaint_steps=args.steps,
                          fixed_batch_every=max(1, min(profile.fixed_batch_every, args.steps // 2)))
    images = args.images.resolve() if args.images is not None else None
    captions = args.captions.resolve() if args.captions is not None else None
    demo = Demo(out, profile, args.seed, images, captions)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    silence_known_noise()
    os.chdir(REPO)  # configs name repository-relative files (the text tower's json)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            passed = run(demo, args.restart)
    except DemoError as e:
        log.error("%s", e)
        return 2
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    summary(demo, passed)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
