#!/usr/bin/env python
"""``make demo``: the whole SD2 inpainting mission in miniature, on CPU, in well under ten minutes.

Every stage is the real entry point a cluster user runs (called in-process: same code, no interpreter
restarts):

1. ``scripts/make_shards.py --demo``: WebDataset shards of the embedded demo photos at 64 px;
2. ``main.py --base configs/demo/autoencoder.yaml --train``: a tiny AutoencoderKL (reconstruction + KL);
3. ``main.py --base configs/demo/base.yaml --train``: a tiny 4-channel text-to-image LatentDiffusion;
4. ``main.py --base configs/demo/inpaint.yaml --train``: the 9-channel inpainting fine-tune of that base
   (zero-init extra channels, LaMa-style masks on the fly, v-objective, EMA), after checking that at step 0 it
   reproduces the base and starts far below a random 9-channel UNet;
5. ``scripts/inpaint.py`` on the held-in photos with fixed masks, and ``scripts/evaluate.py`` scoring the
   fine-tuned model against the same pipeline with an untrained UNet; the mean-colour fill is scored too.

Outputs under ``--out`` (default ``demo_out``): ``inpainting_grid.png`` (input | mask | inpainted),
``plots/*.png`` (loss curves), ``metrics.json`` (every check and score), ``checkpoints/`` (autoencoder, base,
inpaint), ``runs/`` (the main.py run directories), ``eval/`` (evaluate.py's tables and grids), ``samples/``,
``heldin/``, ``shards/``.
``--fast`` is the shortened run the test suite uses (4 of the 10 photos, fewer steps); ``--steps N`` sets the
training steps of every stage (``--steps 10``: a smoke run). Exit status 1 when the model did not learn by the
demo's criterion (masked-region L1 at most half of both baselines'; see metrics.json), 2 when a stage failed.

    python scripts/demo.py --out demo_out          # what `make demo` runs (about 5-6 minutes on 2 idle cores)
    python scripts/demo.py --out /tmp/demo --fast  # the CI-sized run (about 2 minutes)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--outdir", type=Path, default=Path("demo_out"),
                   help="output folder (default demo_out)")
    p.add_argument("--fast", action="store_true", help="the shortened CI run (fewer steps)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of every stage (overrides the profile; e.g. 10 for a smoke run)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below

import demo_report as report  # noqa: E402 - sibling module in scripts/
import yaml  # noqa: E402
from demo_data import DEMO_MANIFEST  # noqa: E402 - sibling module in scripts/

from ldm.checkpoint import load_checkpoint_file  # noqa: E402
from ldm.eval.data import fixed_masks, load_shards  # noqa: E402
from ldm.image_io import load_mask, load_rgb, make_grid, save_png  # noqa: E402
from ldm.inference import load_model  # noqa: E402
from ldm.util import load_config  # noqa: E402

log = logging.getLogger("demo")

CONFIGS = {name: f"configs/demo/{name}.yaml" for name in ("autoencoder", "base", "inpaint")}
SIZE = 64
#: evaluation masks: LaMa's thick and medium evaluation presets. They are drawn for 256 px, so at 64 px they
#: cover ~30-35% after LaMa's "at most half the image" rule. The inpainting grid uses the first one.
EVAL_MASKS = ("lama-thick-256", "lama-medium-256")
#: known-noisy third-party warnings that tell a demo user nothing (Lightning on CPU, streaming dataset)
QUIET_WARNINGS = (
    r".*LeafSpec.*",
    r".*infer the `batch_size`.*",
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*module\(s\) in eval mode.*",
    r".*sync_dist=True.*",
)


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo run.

    Args:
        autoencoder_steps: optimizer steps of stage 2.
        base_steps: optimizer steps of stage 3.
        inpaint_steps: optimizer steps of stage 4.
        sampler_steps: DDIM steps of stage 5.
        guidance_scale: classifier-free guidance scale of stage 5.
        check_batches: training batches used by the step-0 check.
        photos: use only the first this many photos of the demo manifest (None = all ten).
        autoencoder_batch_size: stage-2 batch size (None = the config's 8). Smaller batches, more steps:
            on CPU the autoencoder memorises the photos faster per second that way.
    """

    autoencoder_steps: int
    base_steps: int
    inpaint_steps: int
    sampler_steps: int = 25
    guidance_scale: float = 2.0
    check_batches: int = 2
    photos: int | None = None
    autoencoder_batch_size: int | None = None


PROFILES = {
    "full": Profile(autoencoder_steps=800, base_steps=500, inpaint_steps=500, autoencoder_batch_size=4),
    # CI: the same pipeline on 4 of the 10 photos, so that memorising them takes fewer steps
    "fast": Profile(autoencoder_steps=400, base_steps=150, inpaint_steps=150, sampler_steps=15, photos=4,
                    autoencoder_batch_size=4),
}


class DemoError(RuntimeError):
    """A stage failed; the message names it (its own log lines above say why)."""


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(what: str, entry: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run an entry point's ``main(argv)``, logging the equivalent command line; non-zero status raises."""
    log.info("$ python %s %s", what, " ".join(argv))
    status = entry(argv)
    if status:
        raise DemoError(f"{what} exited with status {status}")


class Demo:
    """The stages of one demo run; each writes under ``out`` and records what it produced in ``metrics``."""

    def __init__(self, out: Path, profile: Profile, seed: int) -> None:
        self.out, self.profile, self.seed = out, profile, seed
        self.shards = out / "shards" / "{00000..00000}.tar"
        self.ckpt = {
            name: out / "checkpoints" / f"{name}.ckpt" for name in ("autoencoder", "base", "inpaint")
        }
        self.runs: dict[str, Path] = {}
        self.metrics: dict[str, Any] = {"profile": asdict(profile), "seed": seed, "seconds": {}}

    # ----------------------------------------------------------------------------------------- stages
    def make_shards(self) -> None:
        manifest = DEMO_MANIFEST
        if self.profile.photos is not None:  # a manifest with the first N entries (make_shards --manifest)
            content = yaml.safe_load(DEMO_MANIFEST.read_text(encoding="utf-8"))
            content["photos"] = content["photos"][: self.profile.photos]
            manifest = self.out / "manifest.yaml"
            manifest.parent.mkdir(parents=True, exist_ok=True)
            manifest.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
        call("scripts/make_shards.py", load_script("make_shards").main, [
            "--demo", "--manifest", str(manifest), "--size", str(SIZE), "--resize-mode", "center_crop",
            "--augment", "none", "--samples-per-shard", "16", "--seed", str(self.seed),
            "--out", str(self.out / "shards")])

    def train(self, name: str, steps: int, overrides: Sequence[str]) -> None:
        """``main.py --base configs/demo/<name>.yaml --train``; its last.ckpt -> checkpoints/<name>.ckpt."""
        import main as ldm_main

        runs = self.out / "runs"
        before = set(runs.glob(f"*_demo-{name}"))
        call("main.py", ldm_main.main, [
            "--base", CONFIGS[name], "--train", "-l", str(runs), "-n", f"demo-{name}", "-s", str(self.seed),
            f"data.params.train.shards={self.shards}", f"lightning.trainer.max_steps={steps}",
            f"lightning.modelcheckpoint.params.every_n_train_steps={steps}",
            f"lightning.callbacks.image_logger.params.batch_frequency={steps}", *overrides])
        new = sorted(set(runs.glob(f"*_demo-{name}")) - before)
        last = new[-1] / "checkpoints" / "last.ckpt" if new else None
        if last is None or not last.is_file():
            raise DemoError(f"main.py wrote no checkpoints/last.ckpt under {runs} for {name}")
        step = load_checkpoint_file(last).get("global_step")
        # main.py returns 0 after a SIGTERM/SIGUSR1 save-and-stop: do not go on with a half-trained model
        if step != steps:
            raise DemoError(
                f"{name} stopped at step {step} of {steps} (interrupted?); resume it with "
                f"python main.py -r {new[-1]} --train, or run the demo again"
            )
        self.runs[name] = new[-1]
        self.ckpt[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(new[-1] / "checkpoints" / "last.ckpt", self.ckpt[name])

    def train_autoencoder(self) -> None:
        batch = self.profile.autoencoder_batch_size
        self.train(
            "autoencoder",
            self.profile.autoencoder_steps,
            [f"data.params.batch_size={batch}"] if batch else [],
        )

    def train_base(self) -> None:
        self.train(
            "base",
            self.profile.base_steps,
            [f"model.params.first_stage_config.params.ckpt_path={self.ckpt['autoencoder']}"],
        )

    def finetune_inpaint(self) -> None:
        overrides = [f"model.params.ckpt_path={self.ckpt['base']}"]
        self.check_start_from_base(overrides)
        self.train("inpaint", self.profile.inpaint_steps, overrides)

    def check_start_from_base(self, overrides: list[str]) -> None:
        """Step 0 of the fine-tune equals the base, and starts far below a random 9-channel UNet."""
        cfg = load_config([CONFIGS["inpaint"]], [*overrides, f"data.params.train.shards={self.shards}"])
        base = load_model(CONFIGS["base"], self.ckpt["base"], use_ema=False, device="cpu").model
        batches = report.first_batches(cfg.data, self.profile.check_batches)
        check = report.start_from_base_check(cfg, base, self.ckpt["base"], batches, self.seed)
        self.metrics["start_from_base"] = report.start_check_dict(check)
        log.info(
            "step 0: max |inpaint UNet - base UNet| = %.2e (outputs ~%.2f); EMA widened exactly: %s",
            check.max_abs_diff,
            check.base_output_scale,
            check.ema_widened_exactly,
        )
        log.info(
            "step 0: loss %.4f from the base vs %.4f for a random 9-channel UNet (ratio %.3f)",
            check.loss_from_base,
            check.loss_random_unet,
            check.loss_ratio,
        )

    def sample_and_evaluate(self) -> None:
        for stale in ("heldin", "samples", "eval"):  # outputs of an earlier run in the same folder
            shutil.rmtree(self.out / stale, ignore_errors=True)
        heldin = self.write_heldin()
        call("scripts/inpaint.py", load_script("inpaint").main, [
            "--config", CONFIGS["inpaint"], "--ckpt", str(self.ckpt["inpaint"]), "--input-dir", str(heldin),
            "--prompts-file", str(heldin / "prompts.txt"), "--out", str(self.out / "samples"),
            "--seed", str(self.seed), *self.sampling_args()])
        untrained = report.untrained_unet_checkpoint(
            self.ckpt["inpaint"],
            load_config([CONFIGS["inpaint"]]).model.params.unet_config,
            "hybrid",
            self.out / "checkpoints" / "untrained_unet.ckpt",
            self.seed,
        )
        call("scripts/evaluate.py", load_script("evaluate").main, [
            "--config", CONFIGS["inpaint"], "--ckpt", f"finetuned={self.ckpt['inpaint']}",
            "--ckpt", f"untrained_unet={untrained}", "--images", str(heldin), "--size", str(SIZE),
            "--masks", *EVAL_MASKS, "--out", str(self.out / "eval"), "--seed", str(self.seed),
            *self.sampling_args()])

    def sampling_args(self) -> list[str]:
        return ["--steps", str(self.profile.sampler_steps), "--scale", str(self.profile.guidance_scale),
                "--device", "cpu"]

    def write_heldin(self) -> Path:
        """The training photos (held-in) as NAME.png, NAME.txt (caption) and NAME_mask.png (fixed mask)."""
        heldin = self.out / "heldin"
        shard = next((self.out / "shards").glob("*.tar"))
        names = shard_names(shard)
        images = load_shards(str(self.shards), SIZE)
        masks = fixed_masks(EVAL_MASKS[0], len(images), SIZE, self.seed)
        for im, mask in zip(images, masks):
            name = names.get(im.key, im.key)
            save_png(im.image, heldin / f"{name}.png")
            save_png(mask, heldin / f"{name}_mask.png")
            (heldin / f"{name}.txt").write_text(im.caption + "\n", encoding="utf-8")
        # one prompt per line in the sorted order in which inpaint.py pairs the images
        ordered = sorted((names.get(im.key, im.key), im.caption) for im in images)
        (heldin / "prompts.txt").write_text("".join(f"{c}\n" for _, c in ordered), encoding="utf-8")
        return heldin

    def report(self) -> bool:
        """Loss plots, the inpainting grid, the baselines and the verdict -> metrics.json."""
        plots = {
            "autoencoder": ("train/rec_loss",),
            "base": ("train/loss_simple",),
            "inpaint": ("train/loss_simple",),
        }
        for name, keys in plots.items():
            report.plot_losses(
                self.runs[name] / "csv" / "version_0" / "metrics.csv",
                keys,
                self.out / "plots" / f"{name}_loss.png",
                f"{name}: {', '.join(keys)}",
            )
        self.write_grid()
        eval_dir = self.out / "eval"
        results = {
            n: json.loads((eval_dir / f"{n}.json").read_text()) for n in ("finetuned", "untrained_unet")
        }
        keys = sorted({s["key"] for s in results["finetuned"]["samples"]})
        mean_colour = report.mean_colour_scores(eval_dir, keys, EVAL_MASKS)
        verdict = report.learning_verdict(
            results["finetuned"], {"untrained_unet": results["untrained_unet"], "mean_colour": mean_colour}
        )
        self.metrics["evaluation"] = {
            n: r.get("groups", r.get("modes")) for n, r in {**results, "mean_colour": mean_colour}.items()
        }
        self.metrics["learning"] = verdict
        self.metrics["first_logged_losses"] = first_losses(self.runs["inpaint"])
        self.metrics["runs"] = {n: str(p) for n, p in self.runs.items()}
        return bool(verdict["passed"])

    def write_grid(self) -> Path:
        """``inpainting_grid.png``: a row per held-in photo, input | mask | inpainted (seed ``self.seed``)."""
        heldin, rows = self.out / "heldin", []
        for image in sorted(p for p in heldin.glob("*.png") if not p.stem.endswith("_mask")):
            sample = self.out / "samples" / f"{image.stem}_seed{self.seed}_0.png"
            rows.append([load_rgb(image), load_mask(heldin / f"{image.stem}_mask.png"), load_rgb(sample)])
        return save_png(make_grid(rows), self.out / "inpainting_grid.png")


def shard_names(shard: Path) -> dict[str, str]:
    """``{sample key: demo photo name}`` from a demo shard's ``.json`` members."""
    names = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                meta = json.load(tar.extractfile(member))
                names[member.name[: -len(".json")]] = str(meta.get("demo_name", member.name))
    return names


def first_losses(run: Path, count: int = 3) -> list[list[float]]:
    """The first ``count`` logged (step, train/loss_simple) pairs of a run."""
    series = report.read_metrics_csv(run / "csv" / "version_0" / "metrics.csv")
    return [[step, value] for step, value in series.get("train/loss_simple", [])[:count]]


def summary(demo: Demo, passed: bool) -> None:
    m, out = demo.metrics, demo.out
    learn, start = m["learning"], m["start_from_base"]
    lines = [
        f"demo finished in {sum(m['seconds'].values()):.0f} s; outputs in {out}/",
        f"  inpainting grid (input | mask | inpainted): {out / 'inpainting_grid.png'}",
        f"  loss curves: {out / 'plots'}/{{autoencoder,base,inpaint}}_loss.png",
        f"  metrics: {out / 'metrics.json'}; evaluate.py tables and grids: {out / 'eval'}/",
        f"  checkpoints: {out / 'checkpoints'}/; main.py runs: {out / 'runs'}/",
        f"masked-region L1: fine-tuned {learn['finetuned_l1_hole']:.4f}, untrained UNet "
        f"{learn['untrained_unet_l1_hole']:.4f} (ratio {learn['ratio_vs_untrained_unet']:.2f}), mean colour "
        f"{learn['mean_colour_l1_hole']:.4f} (ratio {learn['ratio_vs_mean_colour']:.2f}); needed <= "
        f"{learn['factor']}: {'PASSED' if passed else 'FAILED'}",
        f"step 0: UNet max |inpaint - base| {start['max_abs_diff']:.1e}; loss "
        f"{start['loss_from_base']:.3f} from the base vs {start['loss_random_unet']:.3f} for a random "
        "9-channel UNet",
    ]
    for line in lines:
        log.info("%s", line)


def run(demo: Demo) -> bool:
    """Run every stage under a header, timing each; returns the learning verdict (the last stage's result)."""
    stages = [
        ("build shards from the embedded demo photos", demo.make_shards),
        ("train the autoencoder", demo.train_autoencoder),
        ("train the text-to-image base", demo.train_base),
        ("fine-tune the 9-channel inpainting model from the base", demo.finetune_inpaint),
        ("inpaint held-in photos and evaluate", demo.sample_and_evaluate),
        ("write loss plots, the inpainting grid and metrics.json", demo.report),
    ]
    result = None
    for i, (title, stage) in enumerate(stages, 1):
        log.info("=" * 100)
        log.info("stage %d/%d: %s", i, len(stages), title)
        log.info("=" * 100)
        start = time.perf_counter()
        result = stage()
        demo.metrics["seconds"][stage.__name__] = round(time.perf_counter() - start, 1)
    (demo.out / "metrics.json").write_text(json.dumps(demo.metrics, indent=2) + "\n")
    return bool(result)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    cwd = Path.cwd()
    out = args.out if args.out.is_absolute() else cwd / args.out
    profile = PROFILES["fast" if args.fast else "full"]
    if args.steps is not None:
        profile = replace(
            profile, autoencoder_steps=args.steps, base_steps=args.steps, inpaint_steps=args.steps
        )
    demo = Demo(out, profile, args.seed)
    os.chdir(REPO)  # configs name repository-relative files (the text tower's json)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            passed = run(demo)
    except DemoError as e:
        log.error("%s", e)
        return 2
    finally:
        os.chdir(cwd)
    summary(demo, passed)
    if not passed:
        log.error("the fine-tuned model did not reach the learning criterion; see %s", out / "metrics.json")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
