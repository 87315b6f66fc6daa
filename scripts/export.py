#!/usr/bin/env python
"""Export a checkpoint's EMA (or raw) weights for inference and interop.

* ``--out FILE.safetensors|FILE.ckpt``: the official ldm layout (EMA swapped into ``model.diffusion_model.*``,
  ``model_ema.*`` dropped); the parameterization is recorded (safetensors metadata / ckpt key).
* ``--diffusers DIR``: a folder that ``StableDiffusionInpaintPipeline.from_pretrained(DIR)`` loads offline, with
  the scheduler's ``prediction_type`` set from the config (``v_prediction`` for v models).

The checkpoint is first loaded strictly into the config's model, so a wrong config fails here, not in a user's
pipeline.

    python scripts/export.py --config configs/inpaint.yaml --ckpt logs/run/checkpoints/last.ckpt \\
        --out export/sd2-inpaint-v.safetensors --diffusers export/sd2-inpaint-v-diffusers
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.defaults import PRECISION_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model yaml the checkpoint was trained with")
    p.add_argument("--ckpt", required=True, help="training or exported checkpoint (.ckpt / .safetensors)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export EMA weights (default: EMA when the checkpoint has them)")
    p.add_argument("--out", help="official-layout file to write (.safetensors or .ckpt)")
    p.add_argument("--diffusers", help="diffusers pipeline folder to write")
    p.add_argument("--dtype", choices=PRECISION_NAMES, default="fp32", help="cast floating-point weights")
    p.add_argument("--pad-token", default="!",
                   help="diffusers tokenizer pad token; '!' (id 0) pads like open_clip (see write_tokenizer)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.inference import load_model  # noqa: E402
from ldm.interop.diffusers_export import export_diffusers  # noqa: E402
from ldm.interop.ldm_format import save_ldm_checkpoint  # noqa: E402
from ldm.util import load_config  # noqa: E402

log = logging.getLogger("export")
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if not args.out and not args.diffusers:
            raise ValueError("nothing to do: pass --out FILE and/or --diffusers DIR")
        cfg = load_config([args.config])
        loaded = load_model(cfg, args.ckpt, use_ema=args.ema, device="cpu")
        sd = loaded.model.state_dict()
        dtype = DTYPES[args.dtype]
        if args.out:
            save_ldm_checkpoint(sd, args.out, loaded.parameterization, dtype=dtype, global_step=loaded.global_step)
        if args.diffusers:
            export_diffusers(sd, OmegaConf.to_container(cfg.model, resolve=True), args.diffusers, dtype=dtype,
                             pad_token=args.pad_token)
    except (ValueError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    log.info("exported %s weights of %s (parameterization %s)", "EMA" if loaded.used_ema else "raw", args.ckpt,
             loaded.parameterization)
    return 0


if __name__ == "__main__":
    sys.exit(main())
