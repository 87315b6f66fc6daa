"""Metrics that need pretrained networks -- FID, LPIPS, CLIP score -- from library code and local weight files.

Nothing here downloads. Each network is built from a file path the user gives (docs/EVALUATION.md lists the files
and where to get them); a missing path raises :class:`MissingWeightsError` naming the flag, a file that does not
hold the expected network (another network's weights, a model checkpoint) :class:`WeightsFileError` naming flag,
file and the expected network.

* :class:`InceptionFeatures` -- the FID network: the TensorFlow Inception-v3 graph of 2015-12-05 ported to PyTorch,
  the one pytorch-fid, torch-fidelity, clean-fid and torchmetrics share. The module is torchmetrics'
  ``NoTrainInceptionV3`` (a torch-fidelity ``FeatureExtractorInceptionV3``), with torch-fidelity's
  TensorFlow-compatible bilinear resize to 299 px (``antialias=False``, as the original FID code).
* :class:`TorchvisionInceptionFeatures` -- torchvision's ImageNet Inception-v3: only behind the explicit
  ``--fid-torchvision`` option, reported as ``fid_torchvision``; comparable between our own runs only.
* :func:`frechet_distance` -- torchmetrics' ``FrechetInceptionDistance`` on features computed beforehand (so
  features gathered from several processes give the single-process number).
* :class:`LPIPS` -- torchmetrics' LPIPS network (AlexNet, the v0.1 linear heads shipped in the torchmetrics wheel)
  with the AlexNet backbone read from a local torchvision file instead of a download.
* :class:`ClipScore` -- 100 * max(cos(image, text), 0) (Hessel et al. 2021, torchmetrics' formula) with open_clip:
  SD2's text encoder is OpenCLIP ViT-H-14, so the score is read in the same embedding family.

Images are ``N x H x W x 3`` uint8 arrays throughout.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DOC = "docs/EVALUATION.md"
#: first hex digits of the SHA-256 of the standard FID weights (torch.hub convention: they end the file name,
#: ``weights-inception-2015-12-05-6726825d.pth`` / ``pt_inception-2015-12-05-6726825d.pth``)
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
#: AlexNet ``features`` indices of LPIPS's five stages (relu1 .. relu5), as torchmetrics' ``Alexnet`` slices them
ALEX_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
#: pooled Inception layers torch-fidelity exposes; 2048 is FID's
FID_DIMS = (64, 192, 768, 2048)


class MissingWeightsError(ValueError):
    """A metric was requested without its weight file."""


class WeightsFileError(ValueError):
    """A weight file exists but does not hold the network its flag asks for."""


def require_weights(path: str | Path | None, what: str, flag: str) -> Path:
    """``path`` as a Path if it is a file, else :class:`MissingWeightsError` naming ``flag`` (nothing downloads)."""
    if path is None or not Path(path).is_file():
        raise MissingWeightsError(
            f"{what} needs a local weight file ({flag}); {'not given' if path is None else f'{path} not found'}. "
            f"Nothing is downloaded: see {DOC} for the file and where to put it."
        )
    return Path(path)


@contextmanager
def _loading(flag: str, path: Path, expected: str) -> Iterator[None]:
    """Turn any failure of reading ``path`` into the network (a checkpoint, a safetensors file, another
    network's weights, a truncated download) into one :class:`WeightsFileError` line naming flag, file and what
    was expected."""
    try:
        yield
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # torch.load, safetensors and load_state_dict fail in many types; all mean the same
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise WeightsFileError(f"{flag} {path}: not {expected} ({type(e).__name__}: {first[:200]}); see {DOC}"
                               ) from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``N x H x W x 3`` uint8 -> ``N x 3 x H x W`` uint8 tensor on ``device``."""
    # a C-order copy: the same pixels in another memory layout (a transposed view) would take another conv
    # algorithm and change the float32 result in the last bits
    return torch.from_numpy(np.array(images, dtype=np.uint8, order="C")).to(device).permute(0, 3, 1, 2)


class InceptionFeatures(nn.Module):
    """Pool features of the standard FID Inception-v3 (torchmetrics / torch-fidelity class).

    Args:
        weights: the ported TF weights (``weights-inception-2015-12-05-6726825d.pth``, torch-fidelity's layout).
        device: where to run.
        dims: 2048 (pool3: the standard FID, column ``fid``) or an earlier pooled layer of torch-fidelity's,
            64 / 192 / 768 (column ``fid_<dims>d``; cheaper, for smoke runs, comparable with nothing published).
    """

    def __init__(self, weights: str | Path | None, device: str | torch.device = "cpu", dims: int = 2048) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        if dims not in FID_DIMS:
            raise ValueError(f"FID feature size {dims}: expected one of {FID_DIMS}")
        path = require_weights(weights, "FID", "--inception")
        with _loading("--inception", path, "the FID Inception-v3 weights (torch-fidelity's layout, "
                      "weights-inception-2015-12-05-6726825d.pth)"):
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(dims)],
                                          feature_extractor_weights_path=str(path), antialias=False).to(device)
        self.device = torch.device(device)
        self.column = "fid" if dims == 2048 else f"fid_{dims}d"
        self.sha256 = file_sha256(path)
        self.standard = self.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)
        if not self.standard:
            log.warning("%s is not the standard FID Inception file (SHA-256 %s..., expected %s...): FIDs are not "
                        "comparable with published numbers", path, self.sha256[:8], FID_WEIGHTS_SHA256_PREFIX)

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> np.ndarray:
        return self.net(_nchw(images, self.device)).double().cpu().numpy()


class TorchvisionInceptionFeatures(nn.Module):
    """Pool features of torchvision's ImageNet Inception-v3 (``inception_v3_google-0cc3c7bd.pth``): a different
    network from the FID standard, kept only as the labelled ``fid_torchvision`` option.

    Args:
        weights: torchvision Inception-v3 state dict file.
        device: where to run.
    """

    def __init__(self, weights: str | Path | None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = require_weights(weights, "FID (torchvision variant)", "--fid-torchvision")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        with _loading("--fid-torchvision", path, "torchvision's Inception-v3 state dict "
                      "(inception_v3_google-0cc3c7bd.pth)"):
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.fc = nn.Identity()  # pool features instead of logits
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> np.ndarray:
        x = _nchw(images, self.device).float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2.0 - 1.0).double().cpu().numpy()  # this port expects [-1, 1]


class _Precomputed(nn.Module):
    """Feature "extractor" for FrechetInceptionDistance when the features were computed beforehand."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(fake: np.ndarray, real: np.ndarray) -> float:
    """FID between two ``N x D`` feature sets (N >= 2 each), computed by torchmetrics in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: the features are already complete on this process; torchmetrics would otherwise
    # all-reduce its sums across an initialised process group (and wait for ranks that never call it)
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    fid.update(torch.from_numpy(np.asarray(real, dtype=np.float64)), real=True)
    fid.update(torch.from_numpy(np.asarray(fake, dtype=np.float64)), real=False)
    return float(fid.compute())


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018, AlexNet, v0.1 heads; lower = more similar), torchmetrics' network.

    Args:
        backbone: torchvision AlexNet state dict file (``alexnet-owt-7be5be79.pth``; ``features.*`` is used).
        device: where to run.
    """

    def __init__(self, backbone: str | Path | None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips
        from torchvision.models import alexnet

        path = require_weights(backbone, "LPIPS", "--lpips-alexnet")
        features = alexnet(weights=None).features
        with _loading("--lpips-alexnet", path, "torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth)"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        # pnet_rand: build the backbone without torchvision's download; the heads still come from the wheel
        self.net = _NoTrainLpips(net="alex", pnet_rand=True)
        features = features.state_dict()  # "3.weight" -> stage 2 (indices 2..4) -> "slice2.3.weight"
        self.net.net.load_state_dict({f"slice{s + 1}.{k}": v for s, (a, b) in enumerate(ALEX_SLICES)
                                      for k, v in features.items() if a <= int(k.split(".")[0]) < b})
        self.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-pair distances of two ``N x H x W x 3`` uint8 batches -> ``N`` floats."""
        xa, xb = (_nchw(x, self.device).float() / 255.0 for x in (a, b))
        return self.net(xa, xb, normalize=True).reshape(-1).double().cpu().numpy()


def clip_arch(arch: str) -> str:
    """The open_clip model name of ``--clip-arch``: a known name, or a model-config ``.json`` (registered under
    its file stem); anything else is a ValueError naming the flag (open_clip would try to download it)."""
    import open_clip

    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise ValueError(f"--clip-arch {arch}: file not found")
        with _loading("--clip-arch", Path(arch), "an open_clip model-config .json"):
            open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise ValueError(f"--clip-arch {arch}: not an open_clip architecture (e.g. ViT-H-14, ViT-B-32) nor a "
                         "model-config .json")
    return arch


class ClipScore:
    """CLIP score with an open_clip model loaded from a local file.

    Args:
        arch: open_clip model name (``ViT-H-14`` for SD2's text encoder family, ``ViT-B-32``, ...) or the path of
            an open_clip model-config ``.json`` (registered under its file stem).
        weights: the matching open_clip weights file (``open_clip_pytorch_model.bin`` / ``.safetensors``).
        device: where to run.
    """

    def __init__(self, arch: str, weights: str | Path | None, device: str | torch.device = "cpu") -> None:
        import open_clip

        path = require_weights(weights, "CLIP score", "--clip-weights")
        arch = clip_arch(arch)
        with _loading("--clip-weights", path, f"open_clip weights of --clip-arch {arch}"):
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
