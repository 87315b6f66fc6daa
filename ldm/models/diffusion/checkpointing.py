"""The checkpoint side of LatentDiffusion: initialisation from a file, the EMA's timing, and save/resume hooks.

* :meth:`CheckpointMixin.init_from_ckpt` loads ``model.params.ckpt_path`` strictly (documented exceptions only),
  widens the inpainting input conv and starts the EMA from the loaded weights when the file has none (D3).
* The EMA is updated in :meth:`CheckpointMixin.optimizer_step`, right after ``optimizer.step()``. Lightning runs
  the callbacks' ``on_train_batch_end`` (where ``ModelCheckpoint`` saves) *before* the module's own, so an EMA
  updated there made every periodic checkpoint one update behind its weights. Updated here, anything that observes
  the model after optimizer step N -- periodic and weights-only checkpoints, ``last.ckpt``, SIGTERM/SIGUSR1 and
  SLURM saves -- sees exactly N updates. ``optimizer_step`` runs once per optimizer step, so gradient accumulation
  does not multiply updates; a step that a fp16 ``GradScaler`` skips still counts (the EMA follows unchanged
  weights), which keeps ``num_updates == global_step``.
* :meth:`CheckpointMixin.on_save_checkpoint` records the parameterization and provenance (:mod:`ldm.provenance`)
  and refuses to write non-finite weights.
* On resume, :meth:`CheckpointMixin.on_load_checkpoint` refuses a config whose parameterization or fixed scale
  factor differs from the checkpoint's, reconciles settings that change the state's layout (``use_ema``,
  ``scale_by_std``, the noise schedule, trainable parameters, the LR schedule, the architecture:
  :mod:`ldm.models.diffusion.resume_layout`), and :meth:`CheckpointMixin.on_train_start` applies optimizer settings
  that the config changed (learning rate, LR schedule, AdamW weight decay/betas/eps) to the restored optimizer,
  logging each change; without changes the restored state is left bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ldm import compat, provenance
from ldm.checkpoint import (
    CheckpointError,
    drop_prefixes,
    load_checkpoint_file,
    load_into,
    non_finite_tensors,
    state_dict_of,
    widen_input_channels,
)
from ldm.models.diffusion import resume_layout
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.modules.random_weights import mark_loaded

log = logging.getLogger(__name__)

#: checkpoint key of how the run chose its learning rate (base, --scale_lr, global batch factor)
LR_CHOICE_KEY = "learning_rate_choice"

EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")


def recorded_scale_lr(path: str) -> bool | None:
    """The ``--scale_lr`` choice a training checkpoint records (None: written before the record existed).

    Read with mmap (no tensor is loaded), so ``main.py`` can say before training whether a resume rescales.
    """
    choice = load_checkpoint_file(path, mmap=True).get(LR_CHOICE_KEY)
    return None if not isinstance(choice, dict) else bool(choice.get("scale_lr"))


class CheckpointMixin:
    """Checkpoint behaviour shared by :class:`~ldm.models.diffusion.latent_diffusion.LatentDiffusion` and its
    subclasses (mixed in before ``pl.LightningModule``)."""

    finetune_keys: tuple[str, ...] = ()
    keep_finetune_dims: int = 4

    # ------------------------------------------------------------------------------------------ initialisation
    def init_from_ckpt(
        self,
        path: str,
        ignore_keys: Sequence[str] = (),
        only_model: bool = False,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
        allow_missing_prefixes: Sequence[str] = (),
    ) -> tuple[list[str], list[str]]:
        """Initialise from a checkpoint: drop ``ignore_keys``, widen ``finetune_keys``, load strictly, fix the EMA.

        The exceptions to strictness are listed under ``ckpt_path`` in LatentDiffusion's docstring. When the
        checkpoint carries no ``model_ema.*`` tensors (or ``reset_ema``), the EMA is re-initialised from the
        freshly loaded weights, so it never averages towards a random initialisation (DECISIONS D3).

        Raises:
            CheckpointError: unreadable file, impossible shapes, or missing/unexpected tensors (count, first keys).
        """
        obj = load_checkpoint_file(path)
        sd = drop_prefixes(state_dict_of(obj, path), ignore_keys)
        self._check_recorded(path, provenance.read(path, obj), sd)
        if only_model:
            sd = {k: v for k, v in sd.items() if k.startswith(("model.", "model_ema."))}
        has_ema = any(k.startswith("model_ema.") and k not in EMA_SCALARS for k in sd)
        if not self.use_ema and any(k.startswith("model_ema.") for k in sd):
            log.info("%s: its model_ema.* tensors are not loaded (model.params.use_ema is false)", path)
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        shapes = {k: v.shape for k, v in self.state_dict().items()}
        self._check_finetune_widths(path, sd, shapes)
        sd = widen_input_channels(sd, shapes, self.finetune_keys, self.keep_finetune_dims)
        allowed = [*allow_missing_prefixes, *NoiseSchedule.buffer_names(), "scale_factor"]  # from the config
        if only_model:
            allowed += ["first_stage_model.", "cond_stage_model."]  # they come from their own configs
        if self.use_ema and not has_ema:
            allowed.append("model_ema.")  # copied from the loaded weights below
        missing, unexpected = load_into(
            self, sd, source=str(path), allow_missing=allowed,
            hint="To load it partially, list the model key prefixes it may lack in "
                 "model.params.allow_missing_prefixes; drop extra checkpoint keys with model.params.ignore_keys.")
        mark_loaded(self, sd)  # the sub-models this file filled are no longer reported as random
        self._std_done = self.scale_by_std and "scale_factor" in sd
        if self.use_ema:
            if reset_ema or not has_ema:
                log.info("EMA initialised from the loaded model weights (%s)",
                         "reset_ema" if reset_ema else "checkpoint has no EMA")
                self.copy_weights_to_ema()
            carried = int(self.model_ema.num_updates)
            if reset_num_ema_updates and carried:
                # a new run's EMA counts its own updates (num_updates == global_step, D3), so its decay warm-up
                # starts again; a -r resume restores the run's own count from its training checkpoint afterwards
                self.model_ema.reset_num_updates()
                log.info("EMA: %s carried num_updates=%d; reset to 0 for this new run (its decay warm-up restarts; "
                         "model.params.reset_num_ema_updates=false continues the count)", path, carried)
            elif carried:
                log.info("EMA: continuing the num_updates=%d of %s (model.params.reset_num_ema_updates=false): this "
                         "run's checkpoint of step N holds %d + N EMA updates", carried, path, carried)
        return missing, unexpected

    def _check_recorded(self, path: str, recorded: dict[str, Any], sd: dict[str, torch.Tensor]) -> None:
        """Say which objective the run starts from, and refuse latents scaled unlike the checkpoint's training.

        A new run may change the objective (DECISIONS D1: the eps base 512-base-ema.ckpt fine-tuned with v), so a
        recorded parameterization that differs is a warning, never silent. A different fixed ``scale_factor``
        would feed the UNet latents of another scale than it was trained on: an error, as for sampling. A
        ``scale_factor`` tensor (a ``scale_by_std`` run's learned value) counts as recorded, and is dropped when
        this config's factor is fixed.
        """
        theirs = recorded.get("parameterization")
        if theirs is None:
            log.info("%s records no parameterization; this run trains it as '%s'", path, self.parameterization)
        elif theirs != self.parameterization:
            log.warning("%s was trained with parameterization '%s'; this run trains '%s' from its weights (the "
                        "objective changes: intended for the eps base -> v fine-tune, DECISIONS D1)", path, theirs,
                        self.parameterization)
        if self.scale_by_std:
            return
        scale = recorded.get("scale_factor")
        if "scale_factor" in sd:
            learned = float(sd.pop("scale_factor"))
            scale = learned if scale is None else scale
        if scale is not None and not provenance.same_scale(scale, self.scale_factor):
            raise CheckpointError(
                f"{path} was trained with scale_factor {scale} but the config says "
                f"{float(self.scale_factor)}; its UNet would see latents of another scale. Set "
                f"model.params.scale_factor: {scale}."
            )

    def _check_finetune_widths(self, path: str, sd: dict[str, torch.Tensor], shapes: dict[str, Any]) -> None:
        """The widening of ``finetune_keys`` runs once: say when a file is already widened, refuse half of it."""
        present = [k for k in self.finetune_keys if k in sd and k in shapes]
        wide = [k for k in present if tuple(sd[k].shape) == tuple(shapes[k])]
        if wide and len(wide) < len(present):
            narrow = [k for k in present if k not in wide]
            raise CheckpointError(
                f"{path}: '{wide[0]}' already has the model's {tuple(shapes[wide[0]])} but '{narrow[0]}' has "
                f"{tuple(sd[narrow[0]].shape)}; a file whose raw and EMA input convs differ in width is damaged or "
                "was edited by hand. Use the released base (512-base-ema.ckpt) or an unedited checkpoint."
            )
        if wide and any(tuple(shapes[k])[1:2] != (self.keep_finetune_dims,) for k in wide):
            log.warning("%s: its UNet input conv already has %d input channels: loaded as it is, no channel is "
                        "zero-initialised. This run continues a model that was already fine-tuned for inpainting, "
                        "not the text-to-image base (512-base-ema.ckpt)", path, int(shapes[wide[0]][1]))

    @torch.no_grad()
    def copy_weights_to_ema(self) -> None:
        """Set every EMA shadow tensor to the current UNet weight (used after loading a checkpoint)."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                getattr(self.model_ema, compat.ema_buffer_name(name)).copy_(p)

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into the UNet (no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context:
            log.debug("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.model.parameters())

    # --------------------------------------------------------------------------------------- lightning hooks
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.use_ema:  # see the module docstring: every observer after step N sees N updates
            self.model_ema(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_tensors(checkpoint["state_dict"])
        if bad:
            raise CheckpointError(
                f"refusing to write a checkpoint at step {checkpoint.get('global_step')}: {len(bad)} tensors hold "
                f"NaN or inf (first: {', '.join(bad[:3])}). Earlier checkpoints are untouched; resume from one "
                "with a lower learning rate, or check the data."
            )
        checkpoint[provenance.PARAMETERIZATION_KEY] = self.parameterization
        checkpoint[provenance.PROVENANCE_KEY] = provenance.record(self.parameterization, float(self.scale_factor),
                                                                  self.run_config)
        # model.diffusion_model.* of a training checkpoint are the trained weights; an EMA copy is model_ema.*
        checkpoint[provenance.PROVENANCE_KEY]["unet_weights"] = "raw"
        if self.lr_record is not None:
            checkpoint[LR_CHOICE_KEY] = {k: v for k, v in self.lr_record.items() if k != "scale_lr_given"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume: check that the checkpoint was trained like this config says, and let the config's EMA decay win."""
        self._resumed = True
        self._keep_scale_lr(checkpoint.get(LR_CHOICE_KEY))
        sd = checkpoint["state_dict"]
        recorded = provenance.from_checkpoint(checkpoint)
        if recorded["parameterization"] not in (None, self.parameterization):
            raise CheckpointError(
                f"the resume checkpoint was trained with parameterization '{recorded['parameterization']}' but the "
                f"config says '{self.parameterization}'; the objective cannot change within a run. Start a new run "
                "from its weights instead (model.params.ckpt_path=...)."
            )
        if not self.scale_by_std and recorded.get("scale_factor") not in (None, float(self.scale_factor)):
            raise CheckpointError(
                f"the resume checkpoint was trained with scale_factor {recorded['scale_factor']} but the config says "
                f"{float(self.scale_factor)}; set model.params.scale_factor={recorded['scale_factor']}."
            )
        resume_layout.reconcile(self, checkpoint)  # settings that change the state's layout (use_ema, ...)
        if self.scale_by_std and "scale_factor" in sd:
            self._std_done = True
        if self.use_ema and "model_ema.decay" in sd and float(sd["model_ema.decay"]) != float(self.model_ema.decay):
            log.warning("resume: EMA decay %.6g (checkpoint) -> %.6g (config)", float(sd["model_ema.decay"]),
                        float(self.model_ema.decay))
            sd["model_ema.decay"] = self.model_ema.decay.detach().clone()

    def on_train_start(self) -> None:
        if self._resumed:
            self.apply_config_to_restored_optimizers()

    def _keep_scale_lr(self, saved: dict[str, Any] | None) -> None:
        """A resume without ``--scale_lr`` keeps the run's choice: the requeue and SIGTERM commands (``-r RUN
        --train``) do not repeat the flag, and dropping it would divide the learning rate by the global batch.
        Given on the command line, the flag wins (the LR change is then logged as a config change)."""
        now = self.lr_record
        if now is None or saved is None or now["scale_lr_given"] or not saved.get("scale_lr") or now["scale_lr"]:
            return
        self.learning_rate = now["base_learning_rate"] * now["factor"]
        now["scale_lr"] = True
        log.info("resume: the run was started with --scale_lr, which is kept: learning rate %.2e = %d (global batch) "
                 "* %.2e (base_learning_rate); pass --scale_lr false to turn it off", self.learning_rate,
                 now["factor"], now["base_learning_rate"])

    def apply_config_to_restored_optimizers(self) -> None:
        """Make the restored optimizer follow the config: learning rate (and the schedule's current value), weight
        decay, betas and eps. Lightning restores them from the checkpoint, which silently ignored any change."""
        wanted = {"weight_decay": self.weight_decay, "betas": tuple(self.adam_betas), "eps": self.adam_eps}
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in self.trainer.lr_scheduler_configs}
        for opt in self.trainer.optimizers:
            sched = schedulers.get(id(opt))
            for i, group in enumerate(opt.param_groups):
                for key, value in wanted.items():
                    if key in group and tuple(_as_tuple(group[key])) != tuple(_as_tuple(value)):
                        log.warning("resume: AdamW %s %s (checkpoint) -> %s (config)", key, group[key], value)
                        group[key] = value
                base = group.get("initial_lr", group["lr"]) if sched is not None else group["lr"]
                if base != self.learning_rate:
                    log.warning("resume: base learning rate %.4g (checkpoint) -> %.4g (config)", base,
                                self.learning_rate)
                lr = self.learning_rate
                if sched is not None:
                    group["initial_lr"] = self.learning_rate
                    sched.base_lrs[i] = self.learning_rate
                    if hasattr(sched, "lr_lambdas"):  # LambdaLR: the multiplier comes from this config
                        lr = self.learning_rate * sched.lr_lambdas[i](sched.last_epoch)
                    else:
                        lr = group["lr"] * self.learning_rate / base
                if lr != group["lr"]:
                    log.warning("resume: learning rate at step %d is %.4g (was %.4g in the checkpoint)",
                                self.global_step, lr, group["lr"])
                    group["lr"] = lr


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
