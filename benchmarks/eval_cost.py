#!/usr/bin/env python
"""FLOPs of the evaluation protocol and the time they imply on one GPU (an estimate, not a measurement).

Counts, on the meta device (no weights, no memory), one evaluated sample of ``scripts/evaluate.py``: the
inpainting itself (``ModelFlops.sampling_per_image``: steps x 2 UNet forwards with guidance, the masked-image
encode, the decode, two captions) and the metric networks (FID Inception-v3 at 299 px, LPIPS AlexNet at the
evaluation size, OpenCLIP ViT-H-14 image and text towers for the CLIP score), and the in-training held-out
evaluation (EMA and raw weights). Time = FLOPs / (dense bf16 peak x an assumed MFU): the MFU is an input, not
a measurement; ``python benchmarks/sample.py --device cuda`` measures the sampling part on a real GPU.

    python benchmarks/eval_cost.py --config configs/inpaint.yaml --size 512 --steps 50 --mfu 0.3
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/inpaint.yaml", help="model yaml")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--mfu", type=float, default=0.3, help="assumed model FLOPs utilisation for the time estimate")
    p.add_argument("--heldout-images", type=int, default=8, help="images of the in-training held-out set")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help answers before torch is imported

import torch  # noqa: E402
from flops import count_flops, flops_from_config  # noqa: E402

from ldm.callbacks import PEAK_TFLOPS  # noqa: E402
from ldm.util import load_config  # noqa: E402


def metric_flops(size: int) -> dict[str, int]:
    """Forward FLOPs per image of the metric networks (torchvision's Inception-v3 and AlexNet have the FID and
    LPIPS backbones' convolutions; open_clip ViT-H-14 is the CLIP score model)."""
    import open_clip
    import torchvision

    with torch.device("meta"):
        inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        alex = torchvision.models.alexnet().features.eval()
        clip = open_clip.create_model("ViT-H-14", device="meta").eval()
        x299, xs, x224 = (torch.zeros(1, 3, s, s) for s in (299, size, 224))
        tokens = torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad():
        return {
            "fid_inception": count_flops(lambda: inception(x299))[0],
            "lpips_alexnet_x2": 2 * count_flops(lambda: alex(xs))[0],  # output and ground truth
            "clip_image": count_flops(lambda: clip.encode_image(x224))[0],
            "clip_text": count_flops(lambda: clip.encode_text(tokens))[0],
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = flops_from_config(load_config([args.config]).model, args.size)
    per = {"sampling": model.sampling_per_image(args.steps), **metric_flops(args.size)}
    total = sum(per.values())
    print(f"| per evaluated sample ({args.size} px, {args.steps} steps, CFG) | GFLOP |\n|---|---|")
    for name, f in per.items():
        print(f"| {name} | {f / 1e9:,.1f} |")
    print(f"| **total** | **{total / 1e9:,.1f}** |\n")
    heldout = 2 * args.heldout_images * model.sampling_per_image(args.steps)
    step = 8 * model.training_per_sample()  # one GPU's share of a training step at batch 8
    print(f"| estimate at {args.mfu:.0%} MFU (dense bf16 peak) | per 1,000 samples | held-out eval "
          f"({args.heldout_images} images x EMA + raw) | = training steps of 8 samples |\n|---|---|---|---|")
    for gpu in ("A100", "H100"):
        rate = PEAK_TFLOPS[gpu] * 1e12 * args.mfu
        print(f"| {gpu} ({PEAK_TFLOPS[gpu]:g} TFLOP/s) | {1000 * total / rate / 60:.1f} min | "
              f"{heldout / rate:.0f} s | {heldout / step:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
