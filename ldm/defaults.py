"""Defaults shared by the library and the command-line scripts.

This module imports nothing heavy, so scripts can use these values while building their argument parsers,
before torch is imported (``--help`` stays fast).
"""

#: Default classifier-free guidance scale for sampling, evaluation and image logs that do not set one.
#: 7.5 is diffusers' StableDiffusionInpaintPipeline default; SD2's inpainting demos use 10 (docs/DECISIONS.md D11).
GUIDANCE_SCALE: float = 7.5

#: Compute precisions the sampling scripts accept (``ldm.inference.PRECISIONS`` maps them to autocast dtypes).
PRECISION_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")
