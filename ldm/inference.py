"""Inpainting inference: load a checkpoint for sampling, fit image and mask to the model, condition, sample.

The steps follow the SD2 inpainting scripts (docs/DECISIONS.md R4, D11) with the project's fixes made explicit:

* :func:`load_model` builds the model from its yaml and loads a ``.ckpt``/``.safetensors`` in the official layout,
  with or without ``model_ema.*`` (EMA chosen when present unless told otherwise), and rejects files that are not
  checkpoints, do not fit the architecture, or record a different parameterization or scale factor than the config
  (a config that does not state them takes the checkpoint's).
* :func:`fit_to_multiple` / :func:`restore_size` pad (edge) or resize to multiples of 64 and undo it afterwards.
* :func:`inpaint_conditioning`: ``cond = {c_concat: [mask | z(masked image)], c_crossattn: [text]}``; the
  unconditional branch is the model's ``null_conditioning``: it shares ``c_concat`` and only the text becomes
  ``""`` (as SD2 does).
* :func:`inpaint`: samples through ``ldm.models.diffusion.sampling.sample_latents`` (samplers by name). Every
  random draw comes from a seeded generator (x_T and eta noise from a CPU generator, the VAE posterior sample from
  its own stream), so one seed reproduces bit-identically on CPU. Optional paste-back of the known pixels, which
  SD2's scripts do not do.

Left out: SD2's invisible watermark and safety checker, and non-inpainting (text-to-image) sampling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm import provenance
from ldm.checkpoint import (
    CheckpointError,
    check_checkpoint_path,
    check_shapes,
    load_checkpoint_file,
    mismatch_hint,
    state_dict_of,
)
from ldm.data import masks
from ldm.defaults import GUIDANCE_SCALE
from ldm.interop.ldm_format import UNET_WEIGHTS_KEY, select_weights
from ldm.models.diffusion.sampling import SAMPLERS as _REGISTRY
from ldm.models.diffusion.sampling import get_sampler, sample_latents
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.modules.random_weights import deferred_report, mark_loaded, report_random_weights
from ldm.util import instantiate_from_config, load_config

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
FitMode = Literal["pad", "resize"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: sampler names (the registry of ``ldm.models.diffusion.sampling``), for command-line choices
SAMPLERS: tuple[str, ...] = tuple(_REGISTRY)
#: LatentDiffusion's ``timesteps`` when a config does not set it
DEFAULT_TIMESTEPS = 1000
#: buffers recomputed from the config when a checkpoint lacks them (the diffusion schedule, DECISIONS R1)
SCHEDULE_BUFFERS = frozenset(NoiseSchedule.buffer_names())


# ---------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model ready for sampling and where its weights came from.

    Args:
        model: the LatentDiffusion / LatentInpaintDiffusion, in eval mode, without an EMA copy.
        used_ema: True if the UNet holds EMA weights (the checkpoint's ``model_ema.*``, or an export that records
            its UNet as the EMA), False for raw weights, None when the file does not say (no EMA copy, no record).
        parameterization: what the UNet predicts ("eps", "v" or "x0"): the config's, else the checkpoint's.
        source: the checkpoint path.
        global_step: the checkpoint's training step, if recorded.
        provenance: what the checkpoint records (:mod:`ldm.provenance`; at least ``parameterization``).
    """

    model: Any
    used_ema: bool | None
    parameterization: str
    source: str
    global_step: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> str:
        """``"EMA"``, ``"raw"`` or ``"as stored"`` (for logs)."""
        return {True: "EMA", False: "raw", None: "as stored"}[self.used_ema]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else must name a device this machine has.

    Cheap, so scripts call it before loading a model. Raises ``ValueError`` (one line) for a name torch does not
    know (``"gpu"``), or a CUDA / MPS device that is not there.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}, CUDA "
                             f"build {torch.version.cuda}); use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return dev


def schedule_length(config: str | Path | DictConfig) -> int:
    """The number of training timesteps of a config's noise schedule (``timesteps``, or ``given_betas``),
    read without building the model, so a sampler's step count can be checked first
    (``ldm.models.diffusion.sampling.check_steps``)."""
    params = _model_section(config).get("params") or {}
    if params.get("given_betas") is not None:
        return len(params["given_betas"])
    return int(params.get("timesteps", DEFAULT_TIMESTEPS))


def _model_section(config: str | Path | DictConfig) -> dict[str, Any]:
    cfg = load_config([config]) if isinstance(config, (str, Path)) else config
    if "model" not in cfg:
        raise ValueError(f"config {config}: no 'model' section")
    return OmegaConf.to_container(cfg.model, resolve=True)


def build_model(config: str | Path | DictConfig) -> Any:
    """Instantiate the config's ``model`` for inference: no EMA copy, no checkpoint loading in the constructor.

    Sub-models without weights are not reported here (the caller loads a checkpoint next): call
    ``ldm.modules.random_weights.report_random_weights`` after loading.
    """
    model_cfg = _model_section(config)
    params = model_cfg.setdefault("params", {})
    params["use_ema"] = False  # select_weights already put the chosen UNet weights in place
    params.pop("ckpt_path", None)
    with deferred_report():
        model = instantiate_from_config(model_cfg, where="model")
    return model


def _split_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    obj = load_checkpoint_file(path)
    tensors = state_dict_of(obj, path)
    recorded = provenance.read(path, obj)
    step = obj.get("global_step", recorded.get("global_step"))  # safetensors: in the metadata
    return tensors, recorded, int(step) if isinstance(step, int) else None


def _stored_unet_weights(recorded: dict[str, Any]) -> str | None:
    """What an export without ``model_ema.*`` says its UNet holds: "ema", "raw" or None (not recorded).
    Exports record ``unet_weights``; older exports of this project only ``export.ema``."""
    stored = recorded.get(UNET_WEIGHTS_KEY)
    if stored in ("ema", "raw"):
        return stored
    ema = (recorded.get("export") or {}).get("ema") if isinstance(recorded.get("export"), dict) else None
    return {True: "ema", False: "raw"}.get(ema)


def _fp32_schedule(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop noise-schedule tensors stored in reduced precision: the config's float32 schedule is used instead.

    A fp16 ``alphas_cumprod`` moves DDIM's last step from 0.99915 to 0.99902. The stored values must still agree
    with the config's at their own precision (else the checkpoint was trained with another schedule).
    """
    out = dict(sd)
    for name in SCHEDULE_BUFFERS & sd.keys():
        value = sd[name]
        if value.dtype == torch.float32 or name not in own:
            continue
        if not torch.equal(value, own[name].to(value.dtype)):
            raise CheckpointError(f"{path}: its {value.dtype} noise schedule ('{name}') differs from the config's; "
                                  "use the config it was trained with")
        del out[name]
    if len(out) < len(sd):
        log.info("%s: noise schedule stored in reduced precision; using the config's float32 schedule", path)
    return out


def load_model(
    config: str | Path | DictConfig,
    checkpoint: str | Path,
    use_ema: bool | None = None,
    device: str | torch.device = "auto",
) -> LoadedModel:
    """Build the model of ``config`` and load ``checkpoint`` (official layout, ``.ckpt`` or ``.safetensors``).

    What the checkpoint records wins where the config is silent, and must agree where it speaks
    (:func:`ldm.provenance.resolve_parameterization`): the parameterization, and the fixed latent ``scale_factor``
    (a ``scale_by_std`` model carries it as a tensor). The noise schedule is always float32.

    Args:
        config: yaml path or loaded config with a ``model`` section.
        checkpoint: weights file; ``model_ema.*`` tensors are optional.
        use_ema: True = EMA UNet weights (error if absent), False = raw weights, None = EMA when present.
        device: "auto", "cpu", "cuda", ... .

    Raises:
        CheckpointError: not a checkpoint, wrong architecture (names the mismatching tensors), missing or extra
            tensors, or a recorded parameterization / scale factor that differs from the config's.
    """
    path = check_checkpoint_path(checkpoint)
    model_cfg = _model_section(config)
    params = model_cfg.setdefault("params", {})
    sd, recorded, step = _split_checkpoint(path)
    params["parameterization"] = provenance.resolve_parameterization(
        params.get("parameterization"), recorded.get("parameterization"), str(path))
    recorded_scale = recorded.get("scale_factor")
    if "scale_factor" in sd and not params.get("scale_by_std", False):  # a scale_by_std run's learned factor
        learned = float(sd.pop("scale_factor"))
        recorded_scale = learned if recorded_scale is None else recorded_scale
    if recorded_scale is not None and not params.get("scale_by_std", False):
        if "scale_factor" not in params:
            params["scale_factor"] = recorded_scale
        elif not provenance.same_scale(params["scale_factor"], recorded_scale):
            raise CheckpointError(
                f"{path} was trained with scale_factor {recorded_scale} but the config says "
                f"{params['scale_factor']}; latents would be mis-scaled. Use model.params.scale_factor: "
                f"{recorded_scale}"
            )
    sd, used_ema = select_weights(sd, use_ema, source=str(path), stored=_stored_unet_weights(recorded))
    model = build_model(OmegaConf.create({"model": model_cfg}))
    own = model.state_dict()
    check_shapes(sd, {k: v.shape for k, v in own.items()}, str(path))
    sd = _fp32_schedule(sd, own, path)
    if "alphas_cumprod" in sd and not torch.allclose(sd["alphas_cumprod"].float(), own["alphas_cumprod"], atol=1e-6):
        log.warning("%s: its noise schedule differs from the config's; the checkpoint's schedule is used", path)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in SCHEDULE_BUFFERS]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match the config's architecture: {len(missing)} missing tensors "
            f"{missing[:5]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}"
            + mismatch_hint(sd, {k: tuple(v.shape) for k, v in own.items()})
        )
    model.eval().requires_grad_(False).to(resolve_device(str(device)))
    mark_loaded(model, sd)
    report_random_weights(model)  # only what the checkpoint did not bring (nothing, for a complete one)
    loaded = LoadedModel(model, used_ema, model.parameterization, str(path), step, recorded)
    log.info("loaded %s (%s weights, parameterization %s, scale factor %.5f, step %s)", path, loaded.weights,
             model.parameterization, float(model.scale_factor), step)
    return loaded


# ------------------------------------------------------------------------------------------- image geometry
@dataclass(frozen=True)
class Geometry:
    """How an input was fitted to the model, so the output can be brought back to the input size.

    Args:
        size: original (height, width).
        work: fitted (height, width), multiples of ``multiple``.
        mode: "pad" (edge padding right/bottom, undone by cropping) or "resize" (undone by resizing back).
    """

    size: tuple[int, int]
    work: tuple[int, int]
    mode: FitMode


def fit_to_multiple(
    image: np.ndarray, mask: np.ndarray, multiple: int = 64, mode: FitMode = "pad"
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Pad (edge) or resize an ``H x W x 3`` uint8 image and its ``H x W`` mask to multiples of ``multiple``."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                         f"{image.shape[1]}x{image.shape[0]} (width x height); they must match")
    if mode not in ("pad", "resize"):
        raise ValueError(f"fit mode {mode!r}: expected 'pad' or 'resize'")
    h, w = image.shape[:2]
    if mode == "pad":
        th, tw = -(-h // multiple) * multiple, -(-w // multiple) * multiple  # round up
        image = np.pad(image, ((0, th - h), (0, tw - w), (0, 0)), mode="edge")
        mask = np.pad(mask, ((0, th - h), (0, tw - w)), mode="edge")
    else:
        th, tw = (max(multiple, round(s / multiple) * multiple) for s in (h, w))
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BICUBIC))
        mask = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((tw, th), Image.BILINEAR))
    return image, mask, Geometry((h, w), (th, tw), mode)


def restore_size(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo :func:`fit_to_multiple` on an ``H x W x 3`` uint8 output."""
    h, w = geometry.size
    if geometry.mode == "pad":
        return image[:h, :w]
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def image_tensors(image: np.ndarray, mask: np.ndarray, n: int, device: torch.device):
    """``(image, mask, masked_image)`` as ``n x C x H x W`` float tensors (DECISIONS R4).

    The image goes to [-1, 1]; the mask is binarised at 0.5 (white = 1 = inpaint); the masked image is
    ``ldm.data.masks.masked_image`` (the hole is 0, mid grey), as in training.
    """
    x = torch.from_numpy(np.array(image, dtype=np.float32)).div(127.5).sub(1.0)  # H x W x 3 in [-1, 1]
    x = x.permute(2, 0, 1)[None].repeat(n, 1, 1, 1).to(device)  # n x 3 x H x W
    m = torch.from_numpy(masks.binarize_mask(np.asarray(mask)))[None, None].repeat(n, 1, 1, 1).to(device)
    return x, m, masks.masked_image(x, m)


# ------------------------------------------------------------------------------------- conditioning, sampling
def inpaint_conditioning(
    model: Any, mask: torch.Tensor, masked_image: torch.Tensor, prompts: Sequence[str],
    generator: torch.Generator | None = None,
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """Conditional and unconditional conditioning of an inpainting model (DECISIONS R4).

    ``c_concat`` follows ``model.concat_keys``: the mask nearest-resized to the latent grid and the masked image's
    VAE posterior *sample* (drawn from ``generator``) times ``scale_factor`` -- the same tensors
    ``LatentInpaintDiffusion.concat_conditioning`` builds in training, but with a seeded draw. The unconditional
    branch is ``model.null_conditioning``: it shares ``c_concat``; only its text is the encoding of "".
    """
    if not getattr(model, "concat_keys", None):
        raise ValueError(f"{type(model).__name__} is not an inpainting model (no concat_keys)")
    cond = model.inpaint_conditioning(mask, masked_image, model.get_learned_conditioning(list(prompts)), generator)
    return cond, model.null_conditioning(cond)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampler settings.

    Args:
        sampler: a name in :data:`SAMPLERS`: "ddim", or "dpm" (DPM-Solver++ 2M, deterministic: eta must be 0).
        steps: sampler steps.
        scale: classifier-free guidance scale (1 = no guidance).
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
        precision: "fp32", or autocast to "bf16" / "fp16".
        paste_back: replace the known pixels of the output by the input's.
    """

    sampler: str = "ddim"
    steps: int = 50
    scale: float = GUIDANCE_SCALE
    eta: float = 0.0
    precision: Precision = "fp32"
    paste_back: bool = False

    def __post_init__(self) -> None:
        get_sampler(self.sampler).check(self.eta)  # unknown names and the eta rule
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {sorted(PRECISIONS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not math.isfinite(self.scale) or self.scale < 0:  # nan/inf would decode to an all-black image
            raise ValueError(f"guidance scale (--scale) {self.scale:g}: must be finite and >= 0 "
                             "(1 = no guidance, 0 = unconditional)")


class NonFiniteSamples(ValueError):
    """Sampling produced NaN or inf values: the image would be written black by the uint8 clamp."""


def check_seeds(seeds: Sequence[int], flag: str = "--seed") -> None:
    """Seeds are integers >= 0 (they seed numpy ``SeedSequence`` and torch generators); ValueError naming
    ``flag`` otherwise, so a script refuses them before it loads a model."""
    bad = [s for s in seeds if s < 0]
    if bad:
        raise ValueError(f"{flag} {' '.join(map(str, bad))}: seeds must be integers >= 0")


def stream_seed(seed: int, stream: int) -> int:
    """Independent 63-bit seeds per random stream of one user seed (x_T, VAE sample, ... must not coincide)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _autocast(device: torch.device, precision: Precision):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``B x 3 x H x W`` in [-1, 1] -> ``B x H x W x 3`` uint8 (SD2's clamp and rounding-down conversion)."""
    x = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255.0).astype(np.uint8)


@torch.no_grad()
def inpaint(
    model: Any,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    seed: int,
    num_samples: int = 1,
    options: SamplingOptions | None = None,
    fit: FitMode = "pad",
    multiple: int = 64,
) -> list[np.ndarray]:
    """Inpaint ``image`` (``H x W x 3`` uint8) where ``mask`` (``H x W``, white/1 = hole) is set.

    Returns ``num_samples`` uint8 images of the input's size. The same ``(seed, num_samples, options)`` gives
    bit-identical results on CPU.
    """
    options = options or SamplingOptions()
    device = next(model.parameters()).device
    work_img, work_mask, geometry = fit_to_multiple(image, mask, multiple, fit)
    _, m, masked = image_tensors(work_img, work_mask, num_samples, device)
    vae_gen = torch.Generator(device).manual_seed(stream_seed(seed, 1))
    with _autocast(device, options.precision):
        cond, uncond = inpaint_conditioning(model, m, masked, [prompt] * num_samples, vae_gen)
        c_cat = cond["c_concat"][0]
        noise_gen = torch.Generator("cpu").manual_seed(stream_seed(seed, 0))  # x_T and the eta noise
        x_T = torch.randn((num_samples, model.channels, *c_cat.shape[-2:]), generator=noise_gen).to(device)
        samples = sample_latents(model, cond, x_T, sampler=options.sampler, steps=options.steps,
                                 scale=options.scale, uncond=uncond, eta=options.eta, generator=noise_gen)
        decoded = model.decode_first_stage(samples)
    finite = torch.isfinite(decoded).flatten(1).all(1)
    if not bool(finite.all()):  # would be written as black pixels by the clamp below
        raise NonFiniteSamples(f"sampling produced NaN/inf in {int((~finite).sum())} of {num_samples} sample(s) "
                               f"(precision {options.precision}); with fp16 try --precision bf16 or fp32, otherwise "
                               "check the checkpoint's weights for NaN")
    outputs = [restore_size(img, geometry) for img in _to_uint8(decoded)]
    if options.paste_back:
        known = ~masks.is_hole(np.asarray(mask))[..., None]
        outputs = [np.where(known, image, out) for out in outputs]
    return outputs
