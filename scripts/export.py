#!/usr/bin/env python
"""Export a checkpoint's EMA (or raw) weights for inference and interop.

* ``--out FILE.safetensors|FILE.ckpt``: the official ldm layout (EMA swapped into ``model.diffusion_model.*``,
  ``model_ema.*`` dropped); the parameterization is recorded (safetensors metadata / ckpt key).
* ``--diffusers DIR``: a folder that ``StableDiffusionInpaintPipeline.from_pretrained(DIR)`` loads offline, with
  the scheduler's ``prediction_type`` (``v_prediction`` for v models) and the VAE's ``scaling_factor`` taken from
  the model as loaded (a ``scale_by_std`` run's learned factor, not the config's starting value).

The checkpoint is first loaded strictly into the config's model, so a wrong config fails here, not in a user's
pipeline: a config whose parameterization or scale factor differs from the checkpoint's record is refused (a config
that does not state them takes the checkpoint's). Every output records its provenance (the training run's, plus
this export's), which UNet weights it holds (``unet_weights: ema|raw``: loaders then say so, and ``--ema`` on an
export of the EMA just works) and the training step. ``--dtype fp16|bf16`` casts the network weights only; the noise
schedule stays float32.

Outputs are written atomically (a temp file or folder renamed into place). An export never overwrites its input or a
resumable training checkpoint; replacing an earlier export (an existing ``--out`` file or a non-empty ``--diffusers``
folder) needs ``--overwrite``. All paths are checked before the model is loaded.

    python scripts/export.py --config configs/inpaint.yaml --ckpt logs/run/checkpoints/last.ckpt \\
        --out export/sd2-inpaint-v.safetensors --diffusers export/sd2-inpaint-v-diffusers
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.defaults import PRECISION_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model yaml the checkpoint was trained with")
    p.add_argument("--ckpt", required=True, help="training or exported checkpoint (.ckpt / .safetensors)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export EMA weights (default: EMA when the checkpoint has them)")
    p.add_argument("--out", help="official-layout file to write (.safetensors or .ckpt)")
    p.add_argument("--diffusers", help="diffusers pipeline folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export (never the input or a resumable training checkpoint)")
    p.add_argument("--dtype", choices=PRECISION_NAMES, default="fp32",
                   help="cast the network weights (the noise schedule stays float32)")
    p.add_argument("--pad-token", default="!",
                   help="diffusers tokenizer pad token; '!' (id 0) pads like open_clip (see write_tokenizer)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import CheckpointError, check_checkpoint_path  # noqa: E402
from ldm.inference import load_model  # noqa: E402
from ldm.interop.diffusers_export import export_diffusers  # noqa: E402
from ldm.interop.ldm_format import UNET_WEIGHTS_KEY, save_ldm_checkpoint  # noqa: E402
from ldm.paths import export_file, export_folder  # noqa: E402
from ldm.util import load_config  # noqa: E402

log = logging.getLogger("export")
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_record(loaded, model_cfg: dict, scale: float, args: argparse.Namespace) -> dict:
    """The training checkpoint's provenance (or a new one when it has none), plus what this export did."""
    from ldm import provenance

    now = provenance.record(loaded.parameterization, scale, {"model": model_cfg})
    record = {**now, **{k: v for k, v in loaded.provenance.items() if v is not None}}  # the source's record wins
    record.update(parameterization=loaded.parameterization, scale_factor=scale)
    record.pop(UNET_WEIGHTS_KEY, None)  # the source's (a training checkpoint's "raw") does not describe this file
    if loaded.used_ema is not None:
        record[UNET_WEIGHTS_KEY] = "ema" if loaded.used_ema else "raw"
    if loaded.global_step is not None:
        record["global_step"] = loaded.global_step
    record["export"] = {"source": str(args.ckpt), "ema": loaded.used_ema, "dtype": args.dtype,
                        "package_version": provenance.package_version(), "git_revision": provenance.git_revision()}
    return record


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if not args.out and not args.diffusers:
            raise ValueError("nothing to do: pass --out FILE and/or --diffusers DIR")
        check_checkpoint_path(args.ckpt)
        if args.out:
            export_file(args.out, args.ckpt, args.overwrite)
        if args.diffusers:
            export_folder(args.diffusers, args.ckpt, args.overwrite)
        if args.out and args.diffusers and Path(args.diffusers).resolve() in Path(args.out).resolve().parents:
            raise ValueError(f"--out {args.out} lies inside --diffusers {args.diffusers}, which is written (and "
                             "replaced) as a whole folder: the file would be lost. Put --out outside that folder")
        cfg = load_config([args.config])
        loaded = load_model(cfg, args.ckpt, use_ema=args.ema, device="cpu")
        sd = loaded.model.state_dict()
        dtype = DTYPES[args.dtype]
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg["params"]["parameterization"] = loaded.parameterization  # the resolved one
        scale = float(loaded.model.scale_factor)
        record = export_record(loaded, model_cfg, scale, args)
        if args.out:
            save_ldm_checkpoint(sd, args.out, loaded.parameterization, dtype=dtype, global_step=loaded.global_step,
                                provenance=record, ema=loaded.used_ema)
        if args.diffusers:
            export_diffusers(sd, model_cfg, args.diffusers, dtype=dtype, pad_token=args.pad_token,
                             scale_factor=scale, provenance=record)
    except (ValueError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    log.info("exported %s weights of %s (parameterization %s, step %s)", loaded.weights, args.ckpt,
             loaded.parameterization, loaded.global_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
