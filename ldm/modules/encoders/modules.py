"""Text conditioning for SD2: the OpenCLIP text tower, frozen, returning all token states of a chosen layer.

``FrozenOpenCLIPEmbedder`` keeps ldm's class name, constructor and ``self.model.*`` state-dict layout (the
``cond_stage_model.model.*`` keys of SD2 checkpoints), but builds only the text tower: the 632M-parameter vision tower
that ldm builds and then deletes is never created. Weights come from a local file or from open_clip's local cache,
never from the network. Left out of ldm's file: the other embedders (BERT, T5, CLIP-L, image embedders), which no
SD2 inpainting config uses.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from ldm import compat
from ldm.checkpoint import load_state_dict_file
from ldm.config_schema import PositiveInt
from ldm.modules.random_weights import note_random, reports_random_weights
from ldm.util import ConfigError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
COND_STAGE_PREFIX = "cond_stage_model.model."


def load_text_config(arch: str) -> dict[str, Any]:
    """open_clip model config (``embed_dim``, ``text_cfg``, ...) for a built-in name or a JSON file path."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise ValueError(f"arch: JSON model config not found: {path}")
        cfg = json.loads(path.read_text())
    elif arch in open_clip.list_models():
        cfg = open_clip.get_model_config(arch)
    else:
        raise ValueError(
            f"arch={arch!r} is neither an open_clip model name (e.g. 'ViT-H-14') nor a path to a .json config."
        )
    if "embed_dim" not in cfg or "text_cfg" not in cfg:
        raise ValueError(f"arch={arch!r}: the model config needs 'embed_dim' and 'text_cfg' entries.")
    if cfg["text_cfg"].get("hf_model_name"):
        raise ValueError(f"arch={arch!r}: Hugging Face text towers are not supported, only open_clip's own.")
    return cfg


def build_text_tower(cfg: dict[str, Any]) -> nn.Module:
    """Build the text side of an open_clip CLIP with the attribute names ``CLIP`` itself uses.

    The tower (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``,
    ``attn_mask``) is what CLIP stores at its top level, so its keys equal ``CLIP.state_dict()`` minus
    ``visual.*``, once ``logit_scale`` is added back (see below).
    """
    # COMPAT: _build_text_tower is private but has had this signature since open_clip 2.x (DECISIONS R11).
    tower = open_clip.model._build_text_tower(
        cfg["embed_dim"], open_clip.model.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=cfg.get("quick_gelu", False)
    )
    # COMPAT: ldm keeps CLIP's contrastive temperature in the state dict (unused for conditioning);
    # cond_stage_model.model.logit_scale must exist for checkpoints to load strictly. CLIP's init value.
    tower.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
    return tower


def _cached_pretrained_file(arch: str, tag: str) -> str | None:
    """Path of open_clip's weights for (arch, tag) if already in a local cache; never downloads."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        # open_clip's form is "org/repo/" (default file name) or "org/repo/file.bin"
        repo_id = "/".join(hf_hub.split("/")[:2])
        filename = "/".join(hf_hub.split("/")[2:]) or HF_WEIGHTS_NAME
        candidates = (HF_SAFE_WEIGHTS_NAME, filename) if filename == HF_WEIGHTS_NAME else (filename,)
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / Path(url).name  # open_clip's default URL cache
        if path.is_file():
            return str(path)
    return None


def _download_hint(arch: str, tag: str | None) -> str:
    """What to do about missing text-encoder weights: where to get them, or why there are none to get."""
    if arch.endswith(".json"):  # a local architecture file (load_text_config): nobody released weights for it
        return (f"arch={arch!r} is a local architecture file (a test/demo architecture): it has no released "
                "weights, so random weights are expected in tiny and demo runs. "
                "For a real model use an open_clip model name such as 'ViT-H-14' with its weights.")
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if cfg.get("hf_hub"):
        parts = cfg["hf_hub"].split("/")
        what = f"{'/'.join(parts[2:]) or HF_WEIGHTS_NAME} from https://huggingface.co/{'/'.join(parts[:2])}"
    elif cfg.get("url"):
        what = cfg["url"]
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        released = f" (open_clip's released tags for it: {', '.join(tags)})" if tags else ""
        what = f"an open_clip state dict (.bin/.pt/.safetensors) matching arch={arch!r}{released}"
    return f"Download {what} and set cond_stage_config.params.version to the local file path."


class FrozenOpenCLIPEmbedder(nn.Module):
    """OpenCLIP text encoder returning the ``B x max_length x width`` token states of the last or penultimate layer.

    SD2 uses ``ViT-H-14`` with ``layer="penultimate"``: the first 23 of 24 residual blocks, then ``ln_final``; all
    77 positions are returned (no pooling, no ``text_projection``).

    Args:
        arch: open_clip model name (``"ViT-H-14"``) or path to an open_clip-format JSON model config (e.g.
            ``configs/tiny/open_clip_tiny_text.json``). Only ``embed_dim``/``text_cfg`` are used.
        version: weights. A local file (``.bin``/``.pt``/``.pth``/``.ckpt``/``.safetensors``; a full open_clip
            state dict with ``visual.*`` keys or an SD checkpoint with ``cond_stage_model.model.*`` keys is fine),
            or an open_clip pretrained tag (``"laion2b_s32b_b79k"``) that is loaded only if already in the local
            Hugging Face / open_clip cache. None, or a tag that is not cached, means random init; a warning
            follows if no later loading (a ``LatentDiffusion`` ``ckpt_path``) brings the weights
            (``ldm.modules.random_weights``).
        device: accepted for ldm config compatibility and ignored: tokens are sent to the device of the model's
            parameters, so the module follows ``.to(...)`` like any other.
        max_length: token context length (77 for SD2); must not exceed the tower's ``context_length``.
        freeze: put the tower in eval mode and disable gradients; ``train()`` then keeps it in eval mode.
        layer: ``"last"`` (all blocks) or ``"penultimate"`` (all but the last block), followed by ``ln_final``.
    """

    LAYERS = ("last", "penultimate")

    @reports_random_weights
    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | None = "laion2b_s32b_b79k",
        device: str = "cuda",
        max_length: PositiveInt = 77,
        freeze: bool = True,
        layer: Literal["last", "penultimate"] = "last",
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        compat.note_ignored("FrozenOpenCLIPEmbedder", {"device": device})
        cfg = load_text_config(arch)
        context_length = cfg["text_cfg"].get("context_length", 77)
        if not 0 < max_length <= context_length:
            raise ValueError(f"max_length={max_length} must be in 1..{context_length} (the tower's context length)")
        weights = self._resolve_version(arch, version)  # before the (seconds-long) full-size build: fail fast
        self.model = build_text_tower(cfg)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=max_length)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1  # COMPAT: ldm's name for "blocks skipped at the end"
        self.frozen = freeze
        self._load_weights(weights, arch, version)
        if freeze:
            self.freeze()

    def _load_weights(self, path: str | None, arch: str, version: str | None) -> None:
        if self.model.token_embedding.weight.is_meta:
            log.info("FrozenOpenCLIPEmbedder: built on the meta device; weights not loaded (version=%r).", version)
            return
        if path is None:
            note_random(self, f"no text-encoder weights for arch={arch!r} version={version!r}. "
                        f"{_download_hint(arch, version)}")
            return
        self.load_weights(path)

    @staticmethod
    def _resolve_version(arch: str, version: str | None) -> str | None:
        if version is None:
            return None
        if not version.strip():
            raise ConfigError("empty; give a weights file, an open_clip pretrained tag, or null for random weights",
                              key="version")
        if version.endswith(WEIGHT_SUFFIXES) or Path(version).is_file():
            if not Path(version).is_file():
                raise ConfigError(f"weights file not found: {version}", key="version")
            return version
        if not open_clip.pretrained.is_pretrained_cfg(arch, version):
            valid = open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
            raise ConfigError(
                f"{version!r} is neither an existing weights file nor an open_clip pretrained tag of {arch!r} "
                f"(known tags: {valid}). Point version at a local .bin/.safetensors file.", key="version")
        return _cached_pretrained_file(arch, version)

    def load_weights(self, path: str | Path) -> None:
        """Load text-tower weights from ``path``; ``visual.*`` (and any non-text) keys are dropped."""
        sd = load_state_dict_file(path)
        if any(k.startswith(COND_STAGE_PREFIX) for k in sd):  # an SD checkpoint: keep the text encoder part
            sd = {k[len(COND_STAGE_PREFIX):]: v for k, v in sd.items() if k.startswith(COND_STAGE_PREFIX)}
        expected = set(self.model.state_dict())
        text_sd = {k: v for k, v in sd.items() if k in expected}
        # logit_scale only matters for contrastive training; text-only exports may lack it, so keep ours.
        text_sd.setdefault("logit_scale", self.model.logit_scale.detach().clone())
        missing = sorted(expected - set(text_sd))
        if missing:
            raise ValueError(f"version={str(path)!r}: {len(missing)} text-tower keys missing, e.g. {missing[:5]}")
        try:
            self.model.load_state_dict(text_sd, strict=True)
        except RuntimeError as e:  # shape mismatch: wrong arch for these weights
            raise ValueError(f"version={str(path)!r} does not fit arch's text tower: {e}") from e
        log.info("FrozenOpenCLIPEmbedder: loaded %d text tensors from %s (%d other keys dropped)",
                 len(text_sd), path, len(sd) - len(text_sd))

    @property
    def output_dim(self) -> int:
        """Width of the returned token states (1024 for ViT-H-14): what the UNet's ``context_dim`` must be."""
        return int(self.model.ln_final.weight.shape[0])

    def freeze(self) -> None:
        """Eval mode and no gradients; sticky across later ``train()`` calls."""
        self.frozen = True
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    def train(self, mode: bool = True) -> FrozenOpenCLIPEmbedder:
        # Lightning calls .train() on the whole LatentDiffusion every epoch; a frozen encoder must stay in eval.
        return super().train(False if self.frozen else mode)

    def _apply(self, fn: Any, recurse: bool = True) -> FrozenOpenCLIPEmbedder:
        super()._apply(fn, recurse)
        # attn_mask is a non-persistent buffer: after building on the meta device and ``to_empty()`` it holds
        # garbage, and no checkpoint restores it. It depends only on its shape, so rebuild it after every move.
        mask = getattr(self.model, "attn_mask", None)
        if mask is not None and not mask.is_meta:
            self.model.attn_mask = torch.full_like(mask, float("-inf")).triu_(1)
        return self

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """``B x max_length`` token ids: SOT 49406, BPE tokens, EOT 49407, zero padding (truncated to fit)."""
        return self.tokenizer(text)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """``B x L`` token ids -> ``B x L x width`` states after the chosen layer and ``ln_final``."""
        length = tokens.shape[1]
        x = self.model.token_embedding(tokens) + self.model.positional_embedding[:length]  # B x L x width
        mask = self.model.attn_mask  # L x L additive causal mask (None for bidirectional configs)
        x = self.text_transformer_forward(x, attn_mask=None if mask is None else mask[:length, :length])
        return self.model.ln_final(x)

    def text_transformer_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the residual blocks on batch-first ``B x L x width`` input, skipping the last ``layer_idx``."""
        transformer = self.model.transformer
        # COMPAT: open_clip >= 2.2x builds batch-first blocks; ldm (open_clip 2.0.x) permuted to L x B x width.
        # Feeding the wrong layout would attend across the batch, so follow the flag (absent = sequence-first).
        batch_first = getattr(transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)  # B x L x width -> L x B x width
        n_blocks = len(transformer.resblocks) - self.layer_idx
        for block in transformer.resblocks[:n_blocks]:
            x = block(x, attn_mask=attn_mask)
        return x if batch_first else x.transpose(0, 1)  # back to B x L x width

    def forward(self, text: str | list[str]) -> torch.Tensor:
        """Tokenize and encode ``text`` -> ``B x max_length x width`` on the model's device."""
        tokens = self.tokenize(text).to(self.model.token_embedding.weight.device)
        return self.encode_with_transformer(tokens)

    def encode(self, text: str | list[str]) -> torch.Tensor:
        """Same as ``forward`` (ldm's name, used by ``get_learned_conditioning``)."""
        return self(text)
