"""Numerical equivalence of every training fast path with its plain counterpart, and the benchmark helpers.

Fast path vs plain path, on the tiny inpainting model (loss and every UNet gradient unless stated):
SDPA vs explicit softmax attention, torch.compile (aot_eager: dynamo graph capture + AOTAutograd) vs eager,
bf16 autocast vs fp32 (within bf16 tolerance; norms in fp32), channels_last vs contiguous, fused and foreach
AdamW vs the per-tensor loop, foreach EMA vs the reference formula, activation checkpointing (less memory,
same gradients). Precomputed latents are covered in tests/test_precompute_latents.py.

Benchmark helpers (benchmarks/common.py): the tensor-memory tracker, interleaved timing and the insertion
of results into docs/BENCHMARKS.md; and a smoke run of the three benchmark scripts on the tiny model.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ldm.modules.attention import CrossAttention, attention_backend
from ldm.modules.diffusionmodules.util import GroupNorm32
from tests.helpers import REPO, build_tiny, synthetic_batch

sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py; the benchmark scripts import it the same way)


def _perturbed(model):
    """Give every parameter (zero-initialised output layers included) a random offset: every path matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _twin(**params):
    """A tiny inpainting model with the same (perturbed) weights as ``_twin()`` without params."""
    torch.manual_seed(0)
    return _perturbed(build_tiny("inpaint", **params)).train()


def _loss_and_grads(model, seed: int = 3):
    """Training loss at fixed t and noise, and the UNet gradients it gives."""
    batch = synthetic_batch(2)
    torch.manual_seed(seed)
    z, cond = model.get_input(batch, "jpg")
    t = torch.tensor([10, 700])
    loss, _ = model.p_losses(z, cond, t, noise=torch.randn_like(z))
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.model.named_parameters()}


def _assert_same(a, b, atol, rtol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


def test_sdpa_matches_explicit_attention_in_loss_and_gradients():
    model = _twin()
    with attention_backend("sdpa"):
        fast = _loss_and_grads(model)
    with attention_backend("math"):
        plain = _loss_and_grads(model)
    assert fast[1]["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].abs().sum() > 0
    _assert_same(fast, plain, atol=1e-5, rtol=1e-4)


def test_compiled_unet_matches_eager():
    eager = _twin()
    compiled = _twin(compile_unet={"backend": "aot_eager"})
    assert compiled.model.diffusion_model._compiled_call_impl is not None  # really goes through torch.compile
    _assert_same(_loss_and_grads(compiled), _loss_and_grads(eager), atol=1e-5, rtol=1e-4)


def test_compiled_vae_encoder_matches_eager_and_keeps_keys():
    eager, compiled = _twin(), _twin(compile_first_stage_encoder={"backend": "aot_eager"})
    assert compiled.first_stage_model.encoder._compiled_call_impl is not None
    assert eager.first_stage_model.encoder._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged by compiling
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out, ref = compiled.encode_first_stage(x), eager.encode_first_stage(x)
    torch.testing.assert_close(out.parameters, ref.parameters, atol=1e-5, rtol=1e-4)


def test_channels_last_matches_contiguous_in_loss_and_gradients():
    fast = _twin(channels_last=True)
    assert fast.model.diffusion_model.out[2].weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same(_loss_and_grads(fast), _loss_and_grads(_twin()), atol=1e-5, rtol=1e-4)


def test_bf16_autocast_close_to_fp32_with_fp32_group_norm():
    model = _twin()
    loss32, grads32 = _loss_and_grads(model)
    with torch.autocast("cpu", torch.bfloat16):
        loss16, grads16 = _loss_and_grads(model)
    assert loss16.dtype == torch.float32  # the loss is reduced in fp32 under autocast
    assert loss16 != loss32  # bf16 really ran
    torch.testing.assert_close(loss16, loss32, atol=0, rtol=2e-2)
    g16 = torch.cat([g.flatten() for g in grads16.values()])
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    assert (g16 - g32).norm() / g32.norm() < 5e-2  # relative error of the whole gradient, bf16 has 8 bits
    # GroupNorm32 computes its statistics in fp32 and only then casts back (the norms bf16 would break).
    norm = GroupNorm32(4, 8)
    x = (torch.randn(2, 8, 4, 4) * 0.01 + 300.0).bfloat16()  # small variance on a large mean
    expected = torch.nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    torch.testing.assert_close(norm(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kernel", [{"fused": True}, {"foreach": True}])
def test_fused_and_foreach_adamw_match_the_per_tensor_loop(kernel):
    params = [p.detach() for p in _twin().model.parameters()]
    runs = []
    for options in (kernel, {"foreach": False}):
        copies = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(copies, lr=1e-3, weight_decay=0.01, **options)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in copies:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs.append(copies)
    moved = max((a - p).abs().max().item() for a, p in zip(runs[1], params))
    assert moved > 1e-3  # three steps of lr 1e-3 really moved the weights
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_configure_optimizers_picks_the_fused_adamw_kernel_where_torch_has_one(monkeypatch):
    from ldm.models.diffusion import optimizers

    model = _twin()
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple | list) else opt
    # torch >= 2.4 has a fused CPU AdamW (the fastest kernel here, benchmarks/train_step.py); foreach on CPU
    # would be the slowest of the three
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    assert optimizers.adamw_kernel([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]) == {"fused": True}
    # where torch refuses the fused kernel (a device or dtype it has none for), torch's own default is used
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(optimizers.torch.optim, "AdamW", no_fused)
    assert optimizers.adamw_kernel(list(model.model.parameters())) == {}
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple | list) else opt
    assert not opt.defaults["fused"] and not opt.defaults["foreach"]  # torch's default on CPU: the loop


def test_foreach_ema_matches_the_reference_and_the_closed_form():
    model = _twin()
    fast, plain = model.model_ema, _twin().model_ema  # same initial shadow
    start = {s: fast.get_buffer(s).clone() for s in fast.m_name2s_name.values()}
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)  # the EMA now moves towards weights about 1.0 away from its shadow
    decay = 1.0
    for n in range(1, 6):
        fast(model.model)
        plain.update_reference(model.model)
        decay *= min(0.9999, (1 + n) / (10 + n))  # LitEma's warm-up
    params = dict(model.model.named_parameters())
    for name, s_name in fast.m_name2s_name.items():
        shadow, p = fast.get_buffer(s_name), params[name].detach()
        torch.testing.assert_close(shadow, plain.get_buffer(s_name), atol=1e-6, rtol=1e-6)
        # closed form for a constant target p: shadow_n = p + prod(d_i) * (shadow_0 - p)
        torch.testing.assert_close(shadow, p + decay * (start[s_name] - p), atol=1e-6, rtol=1e-5)
    assert int(fast.num_updates) == int(plain.num_updates) == 5


def test_checkpointing_keeps_gradients_and_lowers_unet_memory():
    plain, ckpt = _twin(), _twin(**{"unet_config.params.use_checkpoint": True})
    unet = ckpt.model.diffusion_model
    assert all(b.use_checkpoint for b in unet.modules() if type(b).__name__ == "ResBlock")
    torch.manual_seed(3)
    z, cond = plain.get_input(synthetic_batch(2), "jpg")
    t, noise = torch.tensor([10, 700]), torch.randn_like(z)
    results, saved = [], []
    for model in (plain, ckpt):
        with common.TensorMemoryTracker() as tracker:  # the UNet forward + backward only
            loss, _ = model.p_losses(z, cond, t, noise=noise)
            saved.append(tracker.current)  # what the forward keeps alive for the backward
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.model.named_parameters()}))
    _assert_same(*results, atol=1e-5, rtol=1e-4)
    assert saved[1] < 0.5 * saved[0]


def test_memory_tracker_counts_new_storages_until_freed():
    weight = torch.randn(256, 256)  # created outside: resident, never counted
    with common.TensorMemoryTracker() as tracker:
        view = weight.t()  # a view allocates nothing
        a = weight @ weight  # 256 KiB
        b = a * 2  # another 256 KiB
        del a
        c = b.view(-1)  # view of b: nothing new
        del b, c, view
    assert tracker.peak == 2 * 256 * 256 * 4
    assert tracker.current == 0
    assert common.resident_bytes(weight, weight.t()) == 256 * 256 * 4  # shared storage counted once


def test_sdpa_attention_needs_less_memory_than_explicit_softmax():
    attn = CrossAttention(32, heads=2, dim_head=16).eval()
    x = torch.randn(1, 1024, 32)
    peaks = {}
    for backend in ("sdpa", "math"):
        attn.backend = backend
        with torch.no_grad(), common.TensorMemoryTracker() as tracker:
            attn(x)
        peaks[backend] = tracker.peak
    # the explicit path materialises B x heads x N x N float32 logits (8 MiB here); SDPA never does
    assert peaks["math"] - peaks["sdpa"] >= 2 * 1024 * 1024 * 4


def test_time_interleaved_rotates_the_order_and_paired_ratio():
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = common.time_interleaved(cases, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 for t in times.values())
    assert common.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0  # median of 2, 4, 3


def test_write_results_appends_inside_its_section_only(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Data pipeline\n\ndata text\n\n## Training step\n\nold run\n\n"
                   "## Other\n\nother text\n")
    common.write_results("Training step", "#### Run 2\n\nnew table", doc=doc)
    common.write_results("Sampling", "#### Run 1\n\nsampling table", intro="What it measures.", doc=doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n## Data pipeline\n\ndata text\n\n## Training step\n\n")
    assert text.index("old run") < text.index("new table") < text.index("## Other")
    assert text.index("## Other") < text.index("## Sampling")
    new_section = "## Sampling\n\nWhat it measures.\n\n### Results log\n\n#### Run 1\n\nsampling table\n"
    assert text.endswith(new_section)
    assert text.count("other text") == 1


@pytest.mark.slow
def test_benchmark_scripts_run_on_the_tiny_model(capsys):
    import encode
    import sample
    import train_step

    tiny = ["--config", str(REPO / "configs/tiny/inpaint.yaml"), "--scale", "full", "--resolution", "64",
            "--rounds", "1", "--no-write", "--device", "cpu"]
    train_step.main([*tiny, "--batch", "1", "--warmup", "0"])
    encode.main([*tiny, "--text-rounds", "1", "--warmup", "0"])
    sample.main([*tiny, "--step-rounds", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for variant in ("fast", "plain", "math", "fp32", "nchw", "ckpt", "precomputed"):  # every training variant
        assert any(line.startswith(f"| {variant} | ") for line in rows), variant
    cells = [cell.strip() for line in rows for cell in line.split("|")]
    speedups = [float(cell.strip("*x")) for cell in cells if cell.endswith("x**")]
    assert len(speedups) >= 6 + 3 + 4 + 2 + 4 and all(s > 0 for s in speedups)  # train, micro, encode, sample
    assert out.count("#### Run of ") == 3 and "DPM-Solver++-20" in out and "text bf16" in out
