"""What a ``-r`` resume does when the config changes the *layout* of the training state, not just a value.

Lightning restores a checkpoint with a strict ``load_state_dict`` and then the optimizer and LR-scheduler states
by position. A setting that adds or removes tensors, or trainable parameters, made that a 40-line RuntimeError
(or, for the LR schedule, a silent restart of the warm-up). :func:`reconcile` runs in
:meth:`~ldm.models.diffusion.checkpointing.CheckpointMixin.on_load_checkpoint`, before any of that, and turns each
such setting into a logged, documented choice or one :class:`~ldm.checkpoint.CheckpointError` line:

* ``use_ema`` true -> false: the checkpoint's EMA is dropped (logged); checkpoints from then on have none.
* ``use_ema`` false -> true: an EMA is started from the checkpoint's weights (logged); its warm-up counter starts
  at 0, so ``num_updates`` counts the updates since that resume, not ``global_step``.
* ``scale_by_std`` true -> false: allowed when ``scale_factor`` equals the learned value (the latents stay the
  same), refused otherwise. false -> true: refused (the factor is only estimated at step 0).
* the noise schedule (``timesteps``, ``linear_start``/``linear_end``, ``beta_schedule``, ``given_betas``):
  refused when it differs; the checkpoint's buffers would silently replace the config's.
* ``cond_stage_trainable`` (or anything else that changes which parameters train): refused; the AdamW state is
  per parameter.
* ``scheduler_config`` added: its schedule continues at the checkpoint's step, as if it had run from step 0
  (logged; without this the warm-up restarted). Removed: the learning rate stays at the base value (logged).
* any other architecture change (``unet_config``, ``first_stage_config``, ``cond_stage_config``; e.g. another
  ``in_channels``): refused, naming the sub-model and the first differing tensors.

``finetune_keys``/``keep_finetune_dims`` only shape an initialisation from ``ckpt_path``, which a resume never
loads; they have no effect on a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.schedule import NoiseSchedule

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
#: state-dict prefix -> the config key that builds that part of the model
PARTS = {"model.": "the UNet (model.params.unet_config)", "first_stage_model.": "the VAE (model.params."
         "first_stage_config)", "cond_stage_model.": "the text encoder (model.params.cond_stage_config)"}


def _new_run(model: Any) -> str:
    path = getattr(getattr(model, "_trainer", None), "ckpt_path", None) or "<checkpoint>"
    return f"start a new run from its weights instead (model.params.ckpt_path={path})"


def reconcile(model: Any, checkpoint: dict[str, Any]) -> None:
    """Make ``checkpoint`` restorable into ``model`` where the change is a documented choice; else raise.

    Raises:
        CheckpointError: one line naming the setting that differs and what to do.
    """
    sd = checkpoint["state_dict"]
    step = int(checkpoint.get("global_step", 0))
    _ema(model, sd, step)
    _scale_by_std(model, sd)
    _noise_schedule(model, sd)
    _architecture(model, sd)
    _trainable_parameters(model, checkpoint)
    _lr_schedule(model, checkpoint, step)


def _ema(model: Any, sd: dict[str, torch.Tensor], step: int) -> None:
    ema_keys = [k for k in sd if k.startswith(EMA_PREFIX)]
    if ema_keys and not model.use_ema:
        n = int(sd.get(EMA_PREFIX + "num_updates", torch.tensor(-1)))
        for k in ema_keys:
            del sd[k]
        log.warning("resume: model.params.use_ema=false drops the checkpoint's EMA (%d updates); checkpoints from "
                    "step %d on have no EMA (the earlier ones keep theirs)", n, step)
    elif model.use_ema and not ema_keys:
        ema = model.model_ema
        for name, buffer in ema.m_name2s_name.items():
            if "model." + name in sd:  # a weight missing too is reported by _architecture
                sd[EMA_PREFIX + buffer] = sd["model." + name].detach().clone()
        sd[EMA_PREFIX + "decay"] = ema.decay.detach().clone()
        sd[EMA_PREFIX + "num_updates"] = torch.zeros_like(ema.num_updates)
        log.warning("resume: the checkpoint has no EMA; model.params.use_ema=true starts one from its weights at "
                    "step %d (warm-up from 0: num_updates counts updates since this resume)", step)


def _scale_by_std(model: Any, sd: dict[str, torch.Tensor]) -> None:
    has = "scale_factor" in sd
    if model.scale_by_std and not has:
        raise CheckpointError(
            "the resume checkpoint was trained with a fixed scale_factor, but the config sets "
            "model.params.scale_by_std=true, which estimates the factor at step 0 only (a resume is past it). "
            "Resume with model.params.scale_by_std=false and the run's scale_factor, or " + _new_run(model) + ".")
    if has and not model.scale_by_std:
        learned = float(sd["scale_factor"])
        if learned != float(model.scale_factor):
            raise CheckpointError(
                f"the resume checkpoint learned scale_factor {learned:.6g} (scale_by_std) but the config sets "
                f"scale_by_std=false with scale_factor {float(model.scale_factor):.6g}; the latents would change "
                f"scale mid-run. Resume with model.params.scale_by_std=true, or model.params.scale_factor={learned!r}.")
        del sd["scale_factor"]  # the same factor, now fixed by the config
        log.info("resume: the checkpoint's learned scale_factor %.6g continues as a fixed one (scale_by_std=false)",
                 learned)


def _noise_schedule(model: Any, sd: Mapping[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for name in NoiseSchedule.buffer_names():
        if name not in sd or name not in ours:
            continue
        theirs, mine = sd[name], ours[name]
        if theirs.shape != mine.shape or not torch.allclose(theirs.double(), mine.double().to(theirs.device),
                                                            rtol=1e-5, atol=1e-8):
            what = (f"{theirs.shape[0]} timesteps vs {mine.shape[0]}" if theirs.shape != mine.shape
                    else f"'{name}' differs")
            raise CheckpointError(
                f"the resume checkpoint's noise schedule differs from this config's ({what}): model.params.timesteps, "
                "linear_start, linear_end, beta_schedule and given_betas cannot change within a run. Resume with "
                "the run's values (its configs/ folder), or " + _new_run(model) + ".")


def _weights_first(keys: Any) -> list[str]:
    """EMA shadows after the weights, so that a message names the weight that differs."""
    return sorted(keys, key=lambda k: k.startswith(EMA_PREFIX))


def _architecture(model: Any, sd: Mapping[str, torch.Tensor]) -> None:
    target = model.state_dict()
    missing = _weights_first(k for k in target if k not in sd)
    unexpected = _weights_first(k for k in sd if k not in target)
    reshaped = _weights_first(k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape))
    if not (missing or unexpected or reshaped):
        return
    first = (reshaped or missing or unexpected)[0]
    part = next((v for p, v in PARTS.items() if first.startswith(p)), f"'{first}'")
    detail = (f"'{first}' is {tuple(sd[first].shape)} in the checkpoint, {tuple(target[first].shape)} here"
              if reshaped else f"'{first}' is {'missing from the checkpoint' if missing else 'not in this model'}")
    counts = ", ".join(f"{len(ks)} {what}" for ks, what in ((reshaped, "with another shape"), (missing, "missing"),
                                                          (unexpected, "unexpected")) if ks)
    raise CheckpointError(
        f"the resume checkpoint does not fit this config: {part} differs (tensors: {counts}; {detail}). The "
        "architecture cannot change within a run: resume with the run's config, or " + _new_run(model) + ".")


def _trainable_parameters(model: Any, checkpoint: Mapping[str, Any]) -> None:
    states = checkpoint.get("optimizer_states") or []
    groups = states[0].get("param_groups") if states and isinstance(states[0], Mapping) else None
    if not groups or not all(isinstance(g.get("params"), list) for g in groups):
        return
    saved, now = sum(len(g["params"]) for g in groups), len(model.trainable_parameters())
    if saved == now:
        return
    recorded = ((checkpoint.get("provenance") or {}).get("config") or {}).get("model", {}).get("params", {})
    was = recorded.get("cond_stage_trainable")
    why = (f"model.params.cond_stage_trainable was {was}, the config says {model.cond_stage_trainable}"
           if was is not None and bool(was) != bool(model.cond_stage_trainable)
           else "model.params.cond_stage_trainable or the architecture differs")
    raise CheckpointError(
        f"the resume checkpoint's optimizer state covers {saved} trainable parameters, this config trains {now} "
        f"({why}); AdamW's moments are per parameter. Resume with the run's setting, or " + _new_run(model) + ".")


def _lr_schedule(model: Any, checkpoint: dict[str, Any], step: int) -> None:
    saved = checkpoint.get("lr_schedulers")
    if saved is None:
        return
    if model.scheduler_config is not None and not saved:
        groups = len((checkpoint.get("optimizer_states") or [{}])[0].get("param_groups", [None]))
        # LambdaLR restores these three; the rest (base_lrs, the lambdas) comes from the config
        checkpoint["lr_schedulers"] = [{"last_epoch": step, "_step_count": step + 1, "lr_lambdas": [None] * groups}]
        log.warning("resume: the checkpoint has no LR schedule; model.params.scheduler_config continues at step %d, "
                    "as if it had run from step 0", step)
    elif model.scheduler_config is None and saved:
        checkpoint["lr_schedulers"] = []
        log.warning("resume: model.params.scheduler_config is unset: the checkpoint's LR schedule is dropped and the "
                    "learning rate stays at the base value from step %d", step)
