"""FrozenOpenCLIPEmbedder: layer selection, tokens, batch-first handling, weight loading, freezing, meta builds."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder, _download_hint
from tests.conftest import REPO, read_reference_tsv

TINY = str(REPO / "configs" / "tiny" / "open_clip_tiny_text.json")  # width 32, 3 blocks
PROMPTS = ["a red fox in the snow", "", "an oil painting of a lighthouse at night, dramatic clouds"]
LOGGER = "ldm.modules.encoders.modules"


def tiny(layer: str = "penultimate", **kwargs) -> FrozenOpenCLIPEmbedder:
    return FrozenOpenCLIPEmbedder(arch=TINY, version=kwargs.pop("version", None), layer=layer, **kwargs)


def reference_states(model: torch.nn.Module, text: list[str], n_blocks: int) -> torch.Tensor:
    """Independent recomputation from the open_clip modules: public tokenizer, explicit causal mask,
    the first ``n_blocks`` residual blocks (batch-first), then ln_final."""
    tokens = open_clip.tokenize(text)  # B x 77
    x = model.token_embedding(tokens) + model.positional_embedding
    causal = torch.triu(torch.full((77, 77), float("-inf")), diagonal=1)
    for block in model.transformer.resblocks[:n_blocks]:
        x = block(x, attn_mask=causal)
    return model.ln_final(x)


def test_penultimate_shape_and_equals_n_minus_1_blocks_plus_ln_final():
    enc = tiny("penultimate")
    z = enc.encode(PROMPTS)
    assert z.shape == (3, 77, 32)
    n = len(enc.model.transformer.resblocks)
    assert n == 3
    with torch.no_grad():
        torch.testing.assert_close(z, reference_states(enc.model, PROMPTS, n - 1))
        # and not all n blocks: the last layer is really skipped
        assert not torch.allclose(z, reference_states(enc.model, PROMPTS, n), atol=1e-3)


def test_last_layer_runs_all_blocks_and_differs_from_penultimate():
    pen = tiny("penultimate")
    last = tiny("last")
    last.model.load_state_dict(pen.model.state_dict())
    z_last, z_pen = last(PROMPTS), pen(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(z_last, reference_states(last.model, PROMPTS, 3))
    assert (z_last - z_pen).abs().max() > 1e-2


def test_batch_first_no_attention_across_the_batch():
    enc = tiny("penultimate")
    assert enc.model.transformer.batch_first  # open_clip 3.x
    together = enc(PROMPTS)
    one_by_one = torch.cat([enc([p]) for p in PROMPTS])
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_empty_prompt_tokens_and_truncation():
    enc = tiny()
    tokens = enc.tokenize([""])
    assert tokens.shape == (1, 77)
    assert tokens[0, :2].tolist() == [49406, 49407]
    assert tokens[0, 2:].eq(0).all()
    long = enc.tokenize(["word " * 200])
    assert long.shape == (1, 77) and long[0, -1].item() == 49407 and long[0, 0].item() == 49406
    # causal attention: padding after the EOT cannot change the states of the real tokens
    short = FrozenOpenCLIPEmbedder(arch=TINY, version=None, max_length=8, layer="penultimate")
    short.model.load_state_dict(enc.model.state_dict())
    assert short(["a cat"]).shape == (1, 8, 32)
    torch.testing.assert_close(short(["a cat"])[:, :4], enc(["a cat"])[:, :4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".ckpt"])
def test_version_file_round_trips_weights(tmp_path, suffix, caplog):
    src = tiny()
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"text{suffix}"
    if suffix == ".safetensors":  # a full open_clip state dict: visual keys are dropped
        save_file({**sd, "visual.proj": torch.randn(32, 32)}, str(path))
    elif suffix == ".bin":
        torch.save({**sd, "visual.conv1.weight": torch.randn(4, 3, 2, 2)}, path)
    else:  # an SD checkpoint: Lightning wrapper, cond_stage_model.model. prefix, other models' keys
        torch.save({"state_dict": {f"cond_stage_model.model.{k}": v for k, v in sd.items()}
                    | {"model.diffusion_model.x": torch.ones(2)}, "global_step": 7}, path)
    torch.manual_seed(99)  # a different random init, so equality proves loading
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = tiny(version=str(path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(torch.equal(v, sd[k]) for k, v in loaded.model.state_dict().items())
    torch.testing.assert_close(loaded(PROMPTS), src(PROMPTS))


def test_random_init_warns_exactly_once(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tiny(version=None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "RANDOMLY" in warnings[0].getMessage() and "version" in warnings[0].getMessage()


def test_pretrained_tag_is_looked_up_in_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache ~/.cache/clip: empty too
    assert FrozenOpenCLIPEmbedder._resolve_version("ViT-H-14", "laion2b_s32b_b79k") is None
    hint = _download_hint("ViT-H-14", "laion2b_s32b_b79k")
    assert "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in hint and "open_clip_pytorch_model.bin" in hint

    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}
    repo = tmp_path / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not read here")
    assert FrozenOpenCLIPEmbedder._resolve_version("ViT-H-14", "laion2b_s32b_b79k") == str(weights)


def test_bad_arguments_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        tiny(version=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="pretrained tag"):
        FrozenOpenCLIPEmbedder(arch="ViT-H-14", version="not-a-tag")
    with pytest.raises(ValueError, match="arch"):
        FrozenOpenCLIPEmbedder(arch="No-Such-Model", version=None)
    with pytest.raises(ValueError, match="layer"):
        tiny(layer="pooled")
    with pytest.raises(ValueError, match="max_length"):
        tiny(max_length=100)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"positional_embedding": torch.zeros(77, 64)}, str(wrong))
    with pytest.raises(ValueError, match="missing"):
        tiny(version=str(wrong))


def test_frozen_stays_in_eval_and_has_no_trainable_params():
    enc = tiny()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    trainable = tiny(freeze=False)
    trainable.train()
    assert trainable.model.training and all(p.requires_grad for p in trainable.parameters())


def test_full_vit_h_text_tower_on_meta_matches_reference_keys():
    with torch.device("meta"):
        enc = FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="penultimate")
    got = {f"cond_stage_model.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    ref = {k: v for k, v in read_reference_tsv("sd2-inpainting-keys.tsv").items() if k.startswith("cond_stage_model.")}
    assert len(ref) == 294
    assert got == ref
    assert sum(p.numel() for p in enc.parameters()) == 354_032_641
    assert len(enc.model.transformer.resblocks) == 24 and enc.layer_idx == 1


def test_meta_build_then_to_empty_restores_the_causal_mask():
    src = tiny()
    with torch.device("meta"):
        enc = tiny()
    enc.to_empty(device="cpu")
    enc.model.load_state_dict(src.model.state_dict())
    torch.testing.assert_close(enc.model.attn_mask, torch.triu(torch.full((77, 77), float("-inf")), diagonal=1))
    torch.testing.assert_close(enc(PROMPTS), src(PROMPTS))


def test_missing_weights_advice_fits_the_architecture():
    # a local json architecture has no released weights: no download advice, say it is expected in tiny runs
    local = _download_hint(TINY, None)
    assert "Download" not in local and "no released weights" in local and "expected in tiny" in local
    # a built-in name without a tag: download advice naming the released tags
    builtin = _download_hint("ViT-H-14", None)
    assert builtin.startswith("Download ") and "laion2b_s32b_b79k" in builtin
