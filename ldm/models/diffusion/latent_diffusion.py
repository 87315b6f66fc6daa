"""LatentDiffusion: the Lightning module, with ldm's API (configs reach it as ``ldm.models.diffusion.ddpm``).

``LatentInpaintDiffusion`` (hybrid conditioning on mask + masked-image latent) subclasses it in
:mod:`ldm.models.diffusion.inpainting`; :mod:`ldm.models.diffusion.ddpm` re-exports both under the path that
ldm configs name.

This file owns the *training wiring* only. The math lives in pure modules called from here:
``schedule`` (betas and every derived buffer), ``parameterization`` (q_sample, eps/x0/v, training targets, the
per-mode loss weights), ``losses`` (the loss object) and ``conditioning`` (caption dropout); samplers are reached
through ``sampling``. Checkpoint reading and the 4 -> 9 channel surgery live in :mod:`ldm.checkpoint`, the
module's checkpoint hooks (init, EMA timing, save/resume) in :mod:`ldm.models.diffusion.checkpointing`, AdamW
and the LR schedule in :mod:`ldm.models.diffusion.optimizers`; legacy
quirks and ldm's helper methods in :mod:`ldm.compat`; image logging in :mod:`ldm.models.diffusion.visualize`.

Deliberate differences from the reference (docs/DECISIONS.md):
* the training step never decodes latents back to pixels (D8);
* the EMA is updated once per optimizer step, also with gradient accumulation, right after the step, so every
  checkpoint of step N holds N updates (D3; :mod:`ldm.models.diffusion.checkpointing`);
* when a checkpoint has no ``model_ema.*`` keys the EMA starts from the loaded weights, not random init (D3);
* text dropout (``ucg_training``) draws from a generator seeded by (seed, step, rank), not an unseeded RNG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from einops import rearrange

from ldm import compat
from ldm.config_schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability, Range
from ldm.models.diffusion import losses, optimizers, parameterization, wiring
from ldm.models.diffusion.checkpointing import CheckpointMixin
from ldm.models.diffusion.conditioning import CaptionDropout, check_caption_dropout, drop_captions
from ldm.models.diffusion.schedule import NoiseSchedule, make_beta_schedule
from ldm.models.diffusion.wrapper import DiffusionWrapper
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.random_weights import note_random, reports_random_weights
from ldm.util import ConfigError, instantiate_from_config

log = logging.getLogger(__name__)

__all__ = ["LatentDiffusion", "disabled_train"]

#: a beta of the linear schedules: in (0, 1)
Beta = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]
#: an AdamW beta: in [0, 1), torch's rule
AdamBeta = Annotated[float, Range(0, 1, hi_open=True)]


def disabled_train(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:  # noqa: ARG001
    """Replacement for ``.train()`` on frozen sub-models: they stay in eval mode whatever Lightning asks."""
    return self


class LatentDiffusion(CheckpointMixin, compat.LdmScheduleHelpers, pl.LightningModule):
    """Text-conditioned latent diffusion (SD2 layout) as a LightningModule.

    Args:
        unet_config: UNet ``target``/``params``; wrapped in :class:`DiffusionWrapper` as ``self.model``.
        first_stage_config: VAE config; frozen.
        cond_stage_config: text encoder config (frozen unless ``cond_stage_trainable``).
        timesteps: number of diffusion steps T.
        beta_schedule: ldm schedule name (see ``schedule.make_beta_schedule``; SD uses "linear").
        linear_start, linear_end, cosine_s: schedule parameters.
        given_betas: explicit betas overriding the named schedule.
        v_posterior: weight of beta_t in the posterior variance (0 in SD).
        parameterization: what the UNet predicts: "eps", "x0" or "v" (DECISIONS D1: our inpainting run uses "v").
        loss_type: "l2" (SD) or "l1", per-sample mean over C,H,W.
        l_simple_weight: weight of the simple loss.
        original_elbo_weight: weight of the VLB term (0 in SD).
        logvar_init: fixed per-timestep log-variance of the loss (``loss/exp(logvar) + logvar``; 0 = plain).
        learn_logvar: learn that log-variance (not supported: raises).
        min_snr_gamma: optional Min-SNR-gamma loss weighting (Hang et al. 2023); None keeps SD's plain loss.
        use_ema: keep an EMA copy (LitEma, decay ``ema_decay``) of the UNet, updated once per optimizer step.
        ema_decay: EMA decay (LitEma default 0.9999 with (1+n)/(10+n) warm-up).
        ckpt_path: checkpoint to initialise from (``.ckpt`` or ``.safetensors``). Loading is strict: every model
            tensor must be in the file and every file tensor in the model, except (a) ``model_ema.*`` when the file
            has no EMA at all (the EMA then starts from the loaded weights), (b) the widened ``finetune_keys``,
            (c) the noise-schedule buffers and ``scale_factor`` (recomputed from this config; a factor the file
            records must equal a fixed one), (d) prefixes listed in ``allow_missing_prefixes``. Anything else stops
            with one line giving the count, the first keys and, when recognisable, what the file is (a diffusers
            component, an SD 1.x checkpoint, a key prefix added or missing: :mod:`ldm.interop.layout`). A file whose
            input conv is already 9 wide is loaded as it is (logged), never widened twice.
        ignore_keys: checkpoint key prefixes to drop before loading.
        allow_missing_prefixes: model key prefixes that ``ckpt_path`` may lack (a deliberate partial load, e.g.
            ``[first_stage_model.]`` when the VAE comes from ``first_stage_config.params.ckpt_path``); those
            tensors keep their values from construction. Logged with a count.
        load_only_unet: load only ``model.diffusion_model.*`` (and EMA) tensors from ``ckpt_path``; the VAE and
            text encoder then come from their own configs (their prefixes are allowed to be missing).
        reset_ema: after loading, copy the model weights into the EMA even if the checkpoint had EMA weights.
        reset_num_ema_updates: restart the loaded EMA's update count and warm-up (default); false carries it.
        first_stage_key: batch key of the image (B,H,W,3 in [-1,1]); "jpg" for LAION shards.
        cond_stage_key: batch key of the conditioning (captions: "txt").
        cond_stage_trainable: train the text encoder too (SD: False).
        cond_stage_forward: name of a method of the text encoder to call instead of ``encode``.
        conditioning_key: how the UNet is conditioned (see :class:`DiffusionWrapper`).
        concat_mode: COMPAT: when ``conditioning_key`` is None, choose "concat" (True) or "crossattn".
        force_null_conditioning: COMPAT (unCLIP): force ``conditioning_key`` to None.
        num_timesteps_cond: COMPAT: must be 1 (ldm's conditioning-noise schedule is unused by SD).
        scale_factor: latent scale (0.18215 for the SD VAE).
        scale_by_std: estimate ``scale_factor = 1/std(z)`` from the first training batch (stored as a buffer).
        channels: latent channels.
        ucg_training: ``{batch_key: {p: prob, val: replacement}}`` per-sample condition dropout for CFG.
        ucg_seed: seed of the text-dropout generator (combined with step and rank).
        scheduler_config: LR multiplier config (e.g. ``ldm.lr_scheduler.LambdaLinearScheduler``).
        weight_decay: AdamW weight decay (torch default 0.01, as the reference).
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        monitor, image_size, log_every_t, clip_denoised: accepted for compatibility and ignored; see
            :data:`ldm.compat.IGNORED_PARAMS`.
        use_positional_encodings: must be False (ldm's positional-encoding conditioning is not supported).
        make_it_fit: ldm's cyclic weight-tiling surgery (not supported: raises; use the zero-init widening).
        channels_last: keep the UNet weights and inputs in channels-last memory format (faster convs on GPUs).
        compile_unet: ``torch.compile`` the UNet in place (``nn.Module.compile``: state-dict keys unchanged);
            True for defaults or a dict of ``torch.compile`` keyword arguments.
        compile_first_stage_encoder: the same for the frozen VAE encoder, which runs twice per training sample;
            on an H200 it made the encode 2.6x faster (docs/BENCHMARKS.md, "GPU check").
        shard_optimizer_state: under multi-process DDP, shard the AdamW state across ranks (ZeRO-1 via
            ``torch.distributed.optim.ZeroRedundancyOptimizer``); plain AdamW on a single process.
        latent_moments_key: batch key of precomputed VAE posterior moments of the image (B x 8 x h x w, written
            by scripts/precompute_latents.py). When a batch has it, the image is not encoded online; the
            posterior is still *sampled*, as online. The masked image is always encoded online.
    """

    @reports_random_weights
    def __init__(
        self,
        unet_config: dict[str, Any],
        first_stage_config: dict[str, Any],
        cond_stage_config: dict[str, Any] | str,
        timesteps: PositiveInt = 1000,
        beta_schedule: str = "linear",
        linear_start: Beta = 1e-4,
        linear_end: Beta = 2e-2,
        cosine_s: NonNegativeFloat = 8e-3,
        given_betas: Sequence[float] | None = None,
        v_posterior: Probability = 0.0,
        parameterization: Literal["eps", "x0", "v"] = "eps",
        loss_type: Literal["l1", "l2"] = "l2",
        l_simple_weight: NonNegativeFloat = 1.0,
        original_elbo_weight: NonNegativeFloat = 0.0,
        logvar_init: float = 0.0,
        learn_logvar: bool = False,
        min_snr_gamma: PositiveFloat | None = None,
        use_ema: bool = True,
        ema_decay: Probability = 0.9999,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        allow_missing_prefixes: Sequence[str] = (),
        load_only_unet: bool = False,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = True,
        first_stage_key: str = "image",
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        concat_mode: bool = True,
        force_null_conditioning: bool = False,
        num_timesteps_cond: PositiveInt = 1,
        scale_factor: PositiveFloat = 1.0,
        scale_by_std: bool = False,
        image_size: int = 256,
        channels: PositiveInt = 3,
        ucg_training: Mapping[str, CaptionDropout | Mapping[str, Any]] | None = None,
        ucg_seed: NonNegativeInt = 0,
        scheduler_config: dict[str, Any] | None = None,
        weight_decay: NonNegativeFloat = 0.01,
        adam_betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.999),
        adam_eps: NonNegativeFloat = 1e-8,
        monitor: str | None = "val/loss",
        log_every_t: int = 100,
        clip_denoised: bool = True,
        use_positional_encodings: bool = False,
        make_it_fit: bool = False,
        channels_last: bool = False,
        compile_unet: bool | Mapping[str, Any] = False,
        compile_first_stage_encoder: bool | Mapping[str, Any] = False,
        latent_moments_key: str = "latent_moments",
        shard_optimizer_state: bool = False,
    ) -> None:
        super().__init__()
        compat.note_ignored("LatentDiffusion", {"monitor": monitor, "image_size": image_size,
                                                "log_every_t": log_every_t, "clip_denoised": clip_denoised})
        compat.reject_unsupported("model.params", {
            "learn_logvar": (learn_logvar, False), "make_it_fit": (make_it_fit, False),
            "use_positional_encodings": (use_positional_encodings, False),
            "num_timesteps_cond": (num_timesteps_cond, 1),
        }, error=ConfigError)
        try:
            self.loss_fn = losses.DiffusionLoss(parameterization, loss_type, l_simple_weight, original_elbo_weight,
                                                logvar_init, min_snr_gamma)
        except ValueError as e:
            raise ConfigError(f"model.params.{e}") from e
        self.parameterization = self.loss_fn.parameterization
        if force_null_conditioning:
            conditioning_key = None
        elif conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        required = self.required_conditioning_key
        if required is not None and conditioning_key != required:
            raise ConfigError(f"{type(self).__name__} needs {required!r} ({self.required_conditioning_why}), got "
                              f"{conditioning_key!r}; set conditioning_key: {required}", key="conditioning_key")
        self.conditioning_key = conditioning_key
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.cond_stage_trainable, self.cond_stage_forward = cond_stage_trainable, cond_stage_forward
        self.channels = channels
        self.scheduler_config = scheduler_config
        if scheduler_config is not None:  # built for real in configure_optimizers: fail here, not after start-up
            instantiate_from_config(scheduler_config)
        self.weight_decay, self.adam_betas, self.adam_eps = weight_decay, tuple(adam_betas), adam_eps
        self.shard_optimizer_state = shard_optimizer_state
        self.ucg_training = check_caption_dropout(ucg_training, cond_stage_key)
        self.ucg_seed = ucg_seed
        self.learning_rate = 1.0e-4  # set by main.py from base_learning_rate (and --scale_lr)
        self.lr_record: dict[str, Any] | None = None  # main.py: how learning_rate was chosen (checkpointing.py)

        wiring.check_channels(unet_config, first_stage_config, channels, conditioning_key,
                              self.concat_channels(channels))  # before the (large) UNet is built
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        note_random(self.model, "no model.params.ckpt_path")
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        wiring.compile_in_place(self.model.diffusion_model, compile_unet)
        self.latent_moments_key = latent_moments_key
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        wiring.compile_in_place(getattr(self.first_stage_model, "encoder", None), compile_first_stage_encoder,
                                "model.params.compile_first_stage_encoder")
        self.cond_stage_model = self._build_cond_stage(cond_stage_config)
        wiring.check_context_dim(unet_config, self.cond_stage_model, conditioning_key)

        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s, v_posterior)
        self._std_done = False  # scale_by_std: estimated once, unless a checkpoint brought a scale_factor
        self._latents_checked = False  # the first training batch says whether image latents are precomputed
        self._resumed = False  # set when Lightning restores a training checkpoint (on_load_checkpoint)
        #: the resolved run config, recorded in every checkpoint's provenance (set by main.py)
        self.run_config: dict[str, Any] | None = None

        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=load_only_unet,
                                reset_ema=reset_ema, reset_num_ema_updates=reset_num_ema_updates,
                                allow_missing_prefixes=allow_missing_prefixes)

    # ----------------------------------------------------------------------------------------- construction
    #: the conditioning key this model works with (None: any); subclasses that build ``c_concat`` set it
    required_conditioning_key: str | None = None
    required_conditioning_why = ""

    def concat_channels(self, latent_channels: int) -> list[tuple[str, int]] | None:  # noqa: ARG002
        """``(description, channels)`` of each tensor that a concat-type ``conditioning_key`` stacks after the noisy
        latent, for the start-up channel check (:mod:`ldm.models.diffusion.wiring`); None: not known here."""
        return None

    @staticmethod
    def _frozen(model: torch.nn.Module) -> torch.nn.Module:
        model.eval()
        model.train = disabled_train.__get__(model)  # Lightning calls .train() on the whole module each epoch
        for p in model.parameters():
            p.requires_grad = False
        return model

    def _build_cond_stage(self, config: dict[str, Any] | str) -> torch.nn.Module | None:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            raise ConfigError(f"cond_stage_config={config!r} is not supported; SD2 needs a text encoder config")
        model = instantiate_from_config(config)
        return model if self.cond_stage_trainable else self._frozen(model)

    def register_schedule(self, given_betas: Sequence[float] | None = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3, v_posterior: float = 0.0) -> None:
        """Register ldm's 12 persistent schedule buffers (exact names, float32) and rebuild the loss's
        per-timestep tables for the new schedule."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        with torch.device("cpu"):  # the schedule is computed eagerly, also when the model is built on meta
            self.schedule = NoiseSchedule.from_betas(betas, v_posterior=v_posterior)
            buffers = self.schedule.buffers()
            self.loss_fn.set_schedule(self.schedule)
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end, self.v_posterior = linear_start, linear_end, v_posterior
        for name, value in buffers.items():
            self.register_buffer(name, value)

    # ------------------------------------------------------------------------------------- encoders (frozen)
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution | torch.Tensor:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latent. DECISIONS D5: the posterior is *sampled* (not its mode), in training and sampling."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder output of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, c: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Encode conditioning (captions -> B x 77 x D). Grad flows only if the text encoder is trainable."""
        if isinstance(c, (str, bytes)):
            c = [c]
        with torch.set_grad_enabled(self.cond_stage_trainable and torch.is_grad_enabled()):
            if self.cond_stage_forward is not None:
                return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
            return self.cond_stage_model.encode(list(c) if not torch.is_tensor(c) else c)

    def get_unconditional_conditioning(self, batch_size: int, null_label: Sequence[str] | str | None = None):
        """Encoding of the null caption ("" by default), repeated to ``batch_size`` (ldm semantics)."""
        label = [""] if null_label is None else ([null_label] if isinstance(null_label, str) else list(null_label))
        c = self.get_learned_conditioning(label[:1])
        return c.expand(batch_size, *c.shape[1:]).contiguous()

    def null_conditioning(self, cond: torch.Tensor, null_label: Sequence[str] | str | None = None) -> Any:
        """The unconditional counterpart of the text conditioning ``cond`` (B x 77 x D) for classifier-free
        guidance: the encoding of ``null_label`` ("" by default, what ``ucg_training`` drops captions to)."""
        if not isinstance(cond, torch.Tensor):  # a hybrid dict: LatentInpaintDiffusion keeps its c_concat
            raise TypeError(f"{type(self).__name__}.null_conditioning takes the text tensor, not {type(cond).__name__}")
        return self.get_unconditional_conditioning(cond.shape[0], null_label)

    # ------------------------------------------------------------------------------------------------ inputs
    @staticmethod
    def image_from_batch(batch: Mapping[str, Any], key: str) -> torch.Tensor:
        """Batch images are B,H,W,C in [-1,1] (DECISIONS R7); the networks want B,C,H,W contiguous."""
        x = batch[key]
        if x.ndim == 3:
            x = x[..., None]
        return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()

    def get_input(self, batch: Mapping[str, Any], k: str, bs: int | None = None, **_legacy: Any):
        """Return ``(z, c)``: the scaled image latent and the encoded conditioning.

        ldm's extra return flags (``return_first_stage_outputs`` and friends) are not supported: they made the
        reference decode every training batch (DECISIONS D8). Passing them raises.
        """
        if any(_legacy.values()):
            raise ValueError(f"get_input: options {sorted(k for k, v in _legacy.items() if v)} are not supported")
        cond = batch[self.cond_stage_key][:bs]
        moments = batch.get(self.latent_moments_key)
        if moments is not None:  # precomputed: skip the VAE encoder (about 1.1 TFLOP per 512 px sample)
            posterior = DiagonalGaussianDistribution(moments[:bs].to(self.device).float())
        else:
            posterior = self.encode_first_stage(self.image_from_batch(batch, k)[:bs].to(self.device))
        z = self.get_first_stage_encoding(posterior).detach()
        c = self.get_learned_conditioning(cond)
        return z, c

    def apply_ucg(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Caption dropout for CFG training (``conditioning.drop_captions``), seeded by (ucg_seed, step, rank)."""
        if not self.ucg_training:
            return batch
        rng = np.random.default_rng([self.ucg_seed, int(self.global_step), int(self.global_rank)])
        return drop_captions(batch, self.ucg_training, rng)

    # ------------------------------------------------------------------------------------------------- model
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Run the UNet. ``cond`` is a dict (``c_concat``/``c_crossattn`` lists) or a single tensor/list."""
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            cond = {"c_concat" if self.conditioning_key == "concat" else "c_crossattn": cond}
        return self.model(x_noisy, t, **cond)  # channels_last weights make the convs emit channels_last

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Diffusion loss at timesteps ``t``: noise, predict, compare with the parameterization's target."""
        noise = torch.randn_like(x_start) if noise is None else noise
        a, s = self._ab(t, x_start.ndim)  # sqrt(abar_t), sqrt(1 - abar_t): B x 1 x 1 x 1
        model_output = self.apply_model(parameterization.q_sample(x_start, noise, a, s), t, cond)
        target = parameterization.training_target(self.parameterization, x_start, noise, a, s)
        return self.loss_fn(model_output, target, t, prefix="train" if self.training else "val")

    def forward(self, x: torch.Tensor, c: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()  # uniform t per sample
        return self.p_losses(x, c, t)

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_input(batch, self.first_stage_key)
        return self(z, c)

    # -------------------------------------------------------------------------------------------- lightning
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        batch = self.apply_ucg(batch)  # 1. text dropout on raw captions
        z, cond = self.get_input(batch, self.first_stage_key)  # 2. encode image (+ mask, masked image), text
        loss, logs = self(z, cond)  # 3. sample t and noise, predict, loss
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=z.shape[0])
        self.log("global_step", float(self.global_step), prog_bar=False, on_step=True, on_epoch=False)
        return loss

    def _check_latent_source(self, batch: Mapping[str, Any]) -> None:
        """Once: log that image latents come precomputed, or fail if the data module sends them under another key."""
        self._latents_checked = True
        if self.latent_moments_key in batch:
            log.info("training on precomputed image latents (batch key '%s'): the image is not VAE-encoded, the "
                     "masked image still is", self.latent_moments_key)
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        sidecars = getattr(datamodule, "latent_sidecars", {}).get("train")
        if sidecars:
            present = sorted(k for k in batch if "latent" in str(k))
            raise ConfigError(f"model.params.latent_moments_key: '{self.latent_moments_key}' is not in the training "
                              f"batch (latent keys there: {present}); the data module delivers the precomputed "
                              f"latents of {sidecars[0]} as 'latent_moments'")

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self._latents_checked and isinstance(batch, Mapping):
            self._check_latent_source(batch)
        if self.scheduler_config is not None:  # ldm's lr_abs: the learning rate this step uses
            self.log("lr_abs", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True,
                     on_epoch=False)
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self._std_done:
            with torch.no_grad():
                z, _ = self.get_input(batch, self.first_stage_key)
                # every rank must use the same factor: average over ranks
                std = self.trainer.strategy.reduce(z.flatten().std(), reduce_op="mean")
                self.scale_factor.copy_(self.scale_factor / std)  # z already carries scale_factor
            log.info("scale_by_std: scale_factor set to %.5f", float(self.scale_factor))
            self._std_done = True

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: ARG002
        _, logs = self.shared_step(batch)
        bs = len(batch[self.cond_stage_key])
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        if self.use_ema:
            with self.ema_scope():
                _, logs_ema = self.shared_step(batch)
            self.log_dict({f"{k}_ema": v for k, v in logs_ema.items()}, on_step=False, on_epoch=True,
                          batch_size=bs, sync_dist=True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """UNet parameters (+ text encoder when trainable). The VAE is never optimised."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return params

    def configure_optimizers(self):
        return optimizers.build(self.trainable_parameters(), lr=self.learning_rate, betas=self.adam_betas,
                                eps=self.adam_eps, weight_decay=self.weight_decay,
                                shard_state=self.shard_optimizer_state, scheduler_config=self.scheduler_config)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        from ldm.models.diffusion.visualize import log_images

        return log_images(self, batch, **kwargs)

    def check_log_images_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        """Raise ``ConfigError`` (keyed ``log_images_kwargs.<option>``) unless :meth:`log_images` accepts ``kwargs``."""
        from ldm.models.diffusion.visualize import check_log_images_kwargs

        check_log_images_kwargs(kwargs, self.num_timesteps)

    def training_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model regresses on at ``t`` for the configured parameterization (eps, x0 or v)."""
        return parameterization.training_target(self.parameterization, x_start, noise, *self._ab(t, x_start.ndim))

