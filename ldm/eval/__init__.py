"""Evaluation of inpainting checkpoints: held-out data and fixed masks (``data``), pixel metrics (``metrics``),
weight-file metrics FID / LPIPS / CLIP score (``feature_metrics``), the evaluation loop (``run``) and its
JSON / table / grid outputs (``report``). ``scripts/evaluate.py`` is the command-line entry point."""
