"""ldm: an ldm-compatible reimplementation of the Stable Diffusion 2 inpainting training stack."""
