"""Interoperability with other stacks: the official ldm checkpoint layout and diffusers pipeline folders.

* :mod:`ldm.interop.ldm_format` -- EMA/raw weight selection and plain ``.ckpt`` / ``.safetensors`` export;
* :mod:`ldm.interop.keymaps` -- ldm -> diffusers / transformers state-dict key maps;
* :mod:`ldm.interop.diffusers_export` -- diffusers pipeline folder (configs, weights, tokenizer, scheduler).
"""
