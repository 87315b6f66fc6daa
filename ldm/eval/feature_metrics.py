"""Metrics that need pretrained networks: FID features, LPIPS and CLIP score, from local weight files only.

Nothing here downloads. Each network is built from a file path the user gives (see docs/EVALUATION.md for which
files and where to get them); a missing path raises :class:`MissingWeightsError` saying exactly that.

* :class:`InceptionFeatures` -- 2048-d pool features of torchvision's Inception-v3 (``inception_v3_google-*.pth``)
  for FID. COMPAT: this is torchvision's port, not the TF graph of the original FID paper, so FIDs are comparable
  between our checkpoints but not with numbers published by TF-Inception tools.
* :class:`LPIPS` -- Zhang et al. 2018 with AlexNet: channel-normalised relu1..relu5 features, squared
  differences weighted by the learned 1x1 "lin" heads, spatially averaged and summed. Needs torchvision's AlexNet
  file and the LPIPS v0.1 ``alex.pth`` heads.
* :class:`ClipScore` -- 100 * max(cos(image, text), 0) with an open_clip model and a local weights file.

Images are ``N x H x W x 3`` uint8 arrays throughout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DOC = "docs/EVALUATION.md"
# LPIPS's input scaling (inputs in [-1, 1]): x' = (x - shift) / scale, per RGB channel (Zhang et al. 2018)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEX_RELU_TAPS = (1, 4, 7, 9, 11)  # indices in torchvision alexnet.features after which a stage ends
ALEX_CHANNELS = (64, 192, 384, 256, 256)


class MissingWeightsError(ValueError):
    """A metric was requested without its weight file."""


def _require(path: str | Path | None, what: str, flag: str) -> Path:
    if path is None or not Path(path).is_file():
        raise MissingWeightsError(
            f"{what} needs a local weight file ({flag}); {'not given' if path is None else f'{path} not found'}. "
            f"Nothing is downloaded: see {DOC} for the file and where to put it."
        )
    return Path(path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def _float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> ``N x 3 x H x W`` float in [0, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.float32)).to(device).permute(0, 3, 1, 2) / 255.0


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (2048-d) for FID.

    Args:
        weights: torchvision Inception-v3 state dict file (``inception_v3_google-0cc3c7bd.pth``).
        device: where to run.
    """

    def __init__(self, weights: str | Path | None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = _require(weights, "FID", "--inception")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(_load(path))
        net.fc = nn.Identity()  # pool3 features instead of logits
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> np.ndarray:
        x = F.interpolate(_float(images, self.device), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2.0 - 1.0).double().cpu().numpy()  # Google Inception expects [-1, 1]


class LPIPS(nn.Module):
    """LPIPS distance with an AlexNet backbone (lower = more similar).

    Args:
        backbone: torchvision AlexNet state dict file (``alexnet-owt-7be5be79.pth``; only ``features.*`` is used).
        heads: LPIPS v0.1 linear-head file for AlexNet (``alex.pth``: ``lin0.model.1.weight`` ... ``lin4``).
        device: where to run.
    """

    def __init__(self, backbone: str | Path | None, heads: str | Path | None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torchvision.models import alexnet

        feats = alexnet(weights=None).features
        sd = _load(_require(backbone, "LPIPS", "--lpips-alexnet"))
        feats.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        head_sd = _load(_require(heads, "LPIPS", "--lpips-heads"))
        self.stages = nn.ModuleList()
        start = 0
        for end in ALEX_RELU_TAPS:
            self.stages.append(feats[start : end + 1])
            start = end + 1
        self.heads = nn.ParameterList([nn.Parameter(head_sd[f"lin{i}.model.1.weight"].reshape(1, c, 1, 1))
                                       for i, c in enumerate(ALEX_CHANNELS)])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-pair distances of two ``N x H x W x 3`` uint8 batches -> ``N`` floats."""
        xa, xb = ((_float(x, self.device) * 2 - 1 - self.shift) / self.scale for x in (a, b))
        total = torch.zeros(xa.shape[0], device=self.device)
        for stage, w in zip(self.stages, self.heads):
            xa, xb = stage(xa), stage(xb)
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += ((na - nb) ** 2 * w).sum(1).mean((1, 2))  # 1x1 head, then spatial mean
        return total.double().cpu().numpy()


class ClipScore:
    """CLIP score (Hessel et al. 2021) with an open_clip model loaded from a local file.

    Args:
        arch: open_clip model name (e.g. ``ViT-B-32``, ``ViT-H-14``).
        weights: the matching open_clip weights file (``open_clip_pytorch_model.bin`` / ``.safetensors``).
        device: where to run.
    """

    def __init__(self, arch: str, weights: str | Path | None, device: str | torch.device = "cpu") -> None:
        import open_clip

        path = _require(weights, "CLIP score", "--clip-weights")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(img)) for img in images]).to(self.device)
        fi = F.normalize(self.model.encode_image(x).float(), dim=-1)
        ft = F.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)
        return (100.0 * (fi * ft).sum(-1).clamp(min=0)).double().cpu().numpy()
