#!/usr/bin/env python
"""Train or resume an ldm model: ``python main.py --base configs/inpaint.yaml --train``.

The ldm command line (docs/DECISIONS.md R8): ``--base`` yamls merged in order, then ``a.b.c=value`` overrides
(``~a.b`` deletes a key or a whole section first, e.g. ``~data data.target=...`` replaces the data section);
``-t/--train``, ``-r/--resume`` (a run dir or a checkpoint), ``-n/--name``, ``-l/--logdir``, ``-s/--seed``,
``--scale_lr`` (off by default here; the formula is logged; a resume keeps the run's choice unless given).
Trainer settings live in ``lightning.trainer``
(e.g. ``lightning.trainer.num_nodes=32``). Everything else is in ``ldm.run``, ``ldm.resume`` and
``ldm.callbacks``; the callback names are re-exported so ldm configs' ``main.ImageLogger`` & co. resolve.

Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after saving at the end of the optimizer step), 2 bad input
(config, checkpoint, full disk, a run directory in use by another job: one line), 3 too much bad data, 4 non-finite
loss or exploded gradient norm (the step was not applied).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import sys
from pathlib import Path

log = logging.getLogger("main")


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


BOOL_FLAGS = ("-t", "--train", "-d", "--debug", "--no-test", "--scale_lr")
BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")


def explicit_bools(argv: list[str]) -> list[str]:
    """Make ``--train a.b=c`` mean ``--train true a.b=c``: an optional-value flag must not eat an override."""
    out = []
    for i, tok in enumerate(argv):
        out.append(tok)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in BOOL_FLAGS and (nxt is None or nxt.lower() not in BOOL_WORDS):
            out.append("true")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="base_config.yaml",
                   help="config yamls, merged left to right")
    p.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    p.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=True,
                   help="skip trainer.test after fit (default: skip; pass --no-test false to run it)")
    p.add_argument("-r", "--resume", default="", help="resume from a run directory or a checkpoint file")
    p.add_argument("-n", "--name", default="", help="run name postfix (default: first config's stem)")
    p.add_argument("-p", "--project", default=None, help="accepted for ldm compatibility; unused")
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False, help="debug logging")
    p.add_argument("-s", "--seed", type=int, default=None,
                   help="global seed (default: ldm's 23 for a new run, the run's own seed on resume)")
    p.add_argument("-f", "--postfix", default="", help="suffix appended to the run name")
    p.add_argument("-l", "--logdir", default="logs", help="root directory of runs")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=None,
                   help="scale base_learning_rate by accumulate * devices * nodes * batch size (default off; a "
                        "resume keeps the run's choice unless given)")
    p.add_argument("--break-lock", action="store_true",
                   help="take over the run directory's run.lock although its holder may be alive; only when you "
                        "know that job is dead (its node crashed): two jobs on one run directory lose steps")
    return p


if __name__ == "__main__":
    get_parser().parse_known_args(explicit_bools(sys.argv[1:]))  # --help answers before Lightning loads

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from pytorch_lightning.utilities.exceptions import SIGTERMException  # noqa: E402

from ldm.callbacks import (  # noqa: E402, F401 - ldm configs target main.<Name>
    CUDACallback,
    GracefulStop,
    ImageLogger,
    SetupCallback,
)
from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.data.stats import BadDataError  # noqa: E402
from ldm.data_checks import check_data  # noqa: E402
from ldm.launch import check_launch, global_batch  # noqa: E402
from ldm.models.diffusion.checkpointing import recorded_scale_lr  # noqa: E402
from ldm.modules.random_weights import deferred_report  # noqa: E402
from ldm.quiet import explain_eval_modules, silence_known_noise, silence_resume_noise  # noqa: E402
from ldm.run import (  # noqa: E402
    DEFAULT_SEED,
    build_trainer,
    check_overrides,
    check_sections,
    count_devices,
    effective_lr,
    preflight,
)
from ldm.run_dirs import RunDirs, config_changes, resolve_run_dirs, resume_has_steps_left  # noqa: E402
from ldm.runlock import RunLock, is_launch_rank_zero  # noqa: E402
from ldm.util import ConfigError, instantiate_from_config, load_config  # noqa: E402


def _is_override(token: str) -> bool:
    return "=" in token or token.startswith("~")


def run(argv: list[str]) -> int:
    opt, unknown = get_parser().parse_known_args(explicit_bools(argv))
    # `--base a.yaml x.y=1 ~z` lets nargs="*" swallow the overrides: give them back
    unknown += [b for b in opt.base if _is_override(b)]
    opt.base = [b for b in opt.base if not _is_override(b)]
    bad = [u for u in unknown if not _is_override(u)]
    if bad:
        raise ConfigError(f"unknown argument(s) {bad}; overrides are written key.path=value (~key.path deletes)")
    if opt.name and opt.resume:
        raise ConfigError("-n/--name and -r/--resume cannot be used together (a resumed run keeps its name)")
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")  # rank 0's is the run's (ldm.callbacks.rundir)
    owner = bool(opt.train) and is_launch_rank_zero()  # locks, verifies and tidies the run directory

    def check_config(configs: list[Path]) -> None:  # a resume's config, checked before its checkpoints are read
        cfg = load_config([*configs, *opt.base], unknown)
        check_sections(cfg)
        check_overrides(cfg, unknown)

    dirs = resolve_run_dirs(now, opt.logdir, opt.name or None, opt.postfix, opt.base, opt.resume or None,
                            owner=owner, break_lock=opt.break_lock, check_config=check_config)
    if dirs.resume_ckpt is not None:
        silence_resume_noise()
    try:
        return train(opt, unknown, dirs, now, owner)
    finally:
        if dirs.lock is not None:
            dirs.lock.release()


def train(opt: argparse.Namespace, unknown: list[str], dirs: RunDirs, now: str, owner: bool) -> int:
    cfg = load_config([*dirs.resume_configs, *opt.base], unknown)
    check_sections(cfg)
    check_overrides(cfg, unknown)
    record = None
    if dirs.resume_ckpt is not None:
        if dirs.inherited:
            more = f" (and {len(dirs.inherited) - 8} more)" if len(dirs.inherited) > 8 else ""
            log.warning("resume: starting from %s, which carries %d change(s) that earlier resumes made to the run's "
                        "config: %s%s. Override them on the command line to change them (README: What -r does)",
                        dirs.resume_configs[0], len(dirs.inherited), "; ".join(dirs.inherited[:8]), more)
        changes = config_changes(load_config(dirs.resume_configs), cfg)
        record = {"command_line": {"base": list(opt.base), "overrides": list(unknown)}, "changes": changes}
    if cfg.get("model") is None:
        raise ConfigError("no 'model' section: pass a config with --base")
    if not opt.train and opt.no_test:  # ldm's main.py would at least test; ours skips the test by default
        what = f"continue the run {dirs.logdir}" if dirs.resume_ckpt is not None else "train"
        raise ConfigError(f"nothing to do: without --train no step is trained (and the test is skipped by default); "
                          f"add --train to {what}, or --no-test false to only run trainer.test")
    if opt.train and cfg.get("data") is None:
        raise ConfigError("--train needs a 'data' section (a data module target, e.g. "
                          "ldm.data.laion.WebDataModuleFromConfig); see configs/tiny/inpaint_shards.yaml")
    lightning_cfg = cfg.pop("lightning", OmegaConf.create())
    tcfg = lightning_cfg.get("trainer", {}) or {}
    devices = count_devices(tcfg.get("devices", "auto"), tcfg.get("accelerator", "auto"))
    num_nodes = int(tcfg.get("num_nodes", 1))
    check_launch(devices, num_nodes)  # before anything is written: a mismatch trains copies or hangs
    if opt.train and not resume_has_steps_left(dirs, lightning_cfg):
        return 0
    if dirs.resume_ckpt is None:
        preflight(OmegaConf.merge(cfg, {"lightning": lightning_cfg}))
    else:
        cfg.model.params.ckpt_path = None  # the resume checkpoint supersedes the init checkpoint
    if opt.train:  # a wrong shard path is one line before the model is built or the run directory written
        check_data(OmegaConf.merge(cfg, {"lightning": lightning_cfg}))
    pl.seed_everything(DEFAULT_SEED if opt.seed is None else opt.seed, workers=True)

    trainer = build_trainer(dirs, now, cfg, lightning_cfg, opt.seed, resume=dirs.resume_ckpt is not None,
                            resume_record=record)
    # a resume restores every tensor from its checkpoint, so "starts from random weights" reports would be false
    with deferred_report() if dirs.resume_ckpt is not None else contextlib.nullcontext():
        model = instantiate_from_config(cfg.model, where="model")
    for callback in trainer.callbacks:  # options a callback passes to the model (ImageLogger's log_images_kwargs)
        if callable(getattr(callback, "check_model", None)):
            callback.check_model(model)
    explain_eval_modules(model)
    full_cfg = OmegaConf.merge(cfg, {"lightning": lightning_cfg})
    # every checkpoint records the resolved config it was trained with (ldm.provenance)
    model.run_config = OmegaConf.to_container(full_cfg, resolve=True)
    data = instantiate_from_config(cfg.data, where="data") if cfg.get("data") is not None else None
    bs, accumulate = int(OmegaConf.select(cfg, "data.params.batch_size", default=1) or 1), \
        int(tcfg.get("accumulate_grad_batches", 1))
    base_lr = float(cfg.model.get("base_learning_rate", 1e-4))
    model.learning_rate, formula = effective_lr(base_lr, bs, devices, num_nodes, accumulate, bool(opt.scale_lr))
    batch, factors = global_batch(full_cfg)
    # recorded in every checkpoint: a resume without --scale_lr keeps the run's choice (checkpointing.py)
    model.lr_record = {"base_learning_rate": base_lr, "scale_lr": bool(opt.scale_lr),
                       "scale_lr_given": opt.scale_lr is not None, "factor": batch}
    log.info("run directory: %s", dirs.logdir)
    log.info("%s", formula)
    log.info("global batch %d = %s samples per optimizer step", batch, factors)
    if dirs.resume_ckpt is not None and (was := global_batch(load_config(dirs.resume_configs)))[0] != batch:
        # without the flag, the run's recorded choice applies (checkpointing.py, _keep_scale_lr)
        scaled = opt.scale_lr if opt.scale_lr is not None else recorded_scale_lr(str(dirs.resume_ckpt))
        log.warning("resume: the global batch changes from %d (%s) to %d samples per optimizer step; the learning "
                    "rate is %s. Keep the run's batch with the batch size or lightning.trainer."
                    "accumulate_grad_batches", was[0], was[1], batch,
                    {True: "rescaled by --scale_lr", False: "not rescaled (--scale_lr off)",
                     None: "not rescaled (the checkpoint predates the record of --scale_lr: pass --scale_lr if "
                           "the run was started with it)"}[scaled])
    if opt.train:
        if owner and dirs.lock is None:  # a new run: its directory is locked before anything is written there
            dirs.lock = RunLock(dirs.logdir, opt.break_lock)
        ckpt = str(dirs.resume_ckpt) if dirs.resume_ckpt else None
        try:
            trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        except SIGTERMException:  # a SIGTERM before GracefulStop took the signal over: nothing new to save
            log.warning("stopped by SIGTERM at step %d; resume with: python main.py -r %s --train", trainer.global_step,
                        dirs.logdir)
            return 0
    if not opt.no_test and not trainer.interrupted:
        trainer.test(model, datamodule=data)
    return 0


def last_line(e: BaseException) -> str:
    """The message of ``e``; for one re-raised from a DataLoader worker (it carries the worker's traceback), its last
    line without the exception's class name."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    line = text.splitlines()[-1]
    return line.split(": ", 1)[1] if line.startswith(f"{type(e).__module__}.{type(e).__name__}: ") else line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = any(a in ("-d", "--debug") for a in argv)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    silence_known_noise()
    try:
        return run(argv)
    except (ConfigError, CheckpointError) as e:  # user mistakes: one clear line, no traceback
        log.error("%s", last_line(e))
        return 2
    except BadDataError as e:  # too much bad data: the message names the shards
        log.error("%s", str(e).strip().splitlines()[-1])
        return 3
    except FloatingPointError as e:  # non-finite loss / gradient norm: names the step; checkpoints are untouched
        log.error("%s", e)
        return 4


if __name__ == "__main__":
    sys.exit(main())
