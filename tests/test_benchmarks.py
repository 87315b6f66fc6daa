"""The performance scripts of benchmarks/: the GPU check (shell syntax and a CPU dry run of the same code),
the reference-step comparison (worker protocol, parity check, profile split), the memory model and the
full-size step script at tiny scale. Numbers are not asserted here (that is what the scripts are for); the
machinery that produces them is."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import full_step  # noqa: E402
import memory_model as mm  # noqa: E402
import reference_step as rs  # noqa: E402

TINY = str(REPO / "configs" / "tiny" / "inpaint.yaml")


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]


# -------------------------------------------------------------------------------------------- GPU check
def test_gpu_check_script_is_valid_bash():
    assert shutil.which("bash")
    out = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(REPO / "benchmarks" / "gpu_check.sh", os.X_OK)


def test_gpu_check_wrapper_passes_arguments_limits_time_and_keeps_the_table(tmp_path):
    # a stand-in interpreter: the wrapper's job is the environment, the time limit, the copy of the table and
    # the exit status; the real script runs in the dry-run test below
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "args: $*"\necho "pythonpath: $PYTHONPATH hub: $HF_HUB_OFFLINE"\n'
                    'if [[ "$*" == *--sleep* ]]; then\n'
                    '  trap \'echo interrupted; kill $!; exit 124\' INT; sleep 30 & wait\n'
                    'fi\nexit 3\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "GPU_CHECK_LIMIT_S": "1"}
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    out = subprocess.run([script, "--dry-run", "--batch", "4"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 3  # the script's status comes through the pipe to tee
    assert "args: benchmarks/gpu_check.py --dry-run --batch 4" in out.stdout
    assert f"pythonpath: {REPO}" in out.stdout and "hub: 1" in out.stdout
    assert (tmp_path / "out" / "gpu_check.md").read_text() == out.stdout
    out = subprocess.run([script, "--dry-run", "--sleep"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 124 and "interrupted" in out.stdout  # SIGINT at GPU_CHECK_LIMIT_S


@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_complete_table(monkeypatch, capsys):
    import gpu_check
    import train_step

    monkeypatch.chdir(REPO)  # the tiny config names its text tower relative to the repository
    real_step_fn = train_step.step_fn

    def step_fn(inst, s, batch, device):  # one case fails: it gets its row, the others still run
        if s.precomputed and not s.compile:
            raise RuntimeError("injected failure")
        return real_step_fn(inst, s, batch, device)

    monkeypatch.setattr(train_step, "step_fn", step_fn)
    assert gpu_check.main(["--dry-run", "--sample-steps", "4", "--budget-s", "0"]) == 1
    out = capsys.readouterr().out
    final = out[out.index("#### Run of "):]
    rows = {r[0]: r for r in _rows(final) if r[0] != "case"}
    assert "**failed**: RuntimeError: injected failure" in rows["train, eager, precomputed"][7]
    train = ["train, eager, online encoders", "train, compiled, online encoders",
             "train, compiled, precomputed image latents"]
    assert set(train) <= rows.keys()
    for name in train:
        rate = float(rows[name][2].strip("*"))
        mfu = float(rows[name][4].strip("*%"))
        assert rate > 0 and 0 < mfu < 1000, rows[name]
    # precomputed latents skip one of the two VAE encodes: fewer model FLOPs per sample
    assert float(rows[train[2]][3]) < float(rows[train[1]][3])
    assert float(rows["train, eager, online encoders"][5]) > 0  # live-tensor peak on a CPU
    (sampling,) = [r for name, r in rows.items() if name.startswith("DDIM-4 + CFG")]
    assert float(sampling[2].split()[0].strip("*")) > 0
    assert "compile" in rows["train, compiled, online encoders"][7]
    assert "Compiled sampling skipped" in final  # --budget-s 0


@pytest.mark.slow
def test_gpu_profile_dry_run_splits_the_step_and_compares_encoder_variants(monkeypatch, tmp_path, capsys):
    import gpu_profile

    monkeypatch.chdir(REPO)
    assert gpu_profile.main(["--dry-run", "--batches", "2", "--rounds", "1", "--top", "5",
                             "--out", str(tmp_path / "p.txt")]) == 0
    text = (tmp_path / "p.txt").read_text()
    phases = {r[0]: r for r in _rows(text) if r[0] not in ("phase (batch 8)", "sum", "batch")}
    names = ["encode (2 x VAE, text)", "UNet forward + v-loss", "backward", "AdamW (fused)", "EMA"]
    assert set(names) <= phases.keys()
    ms = [float(phases[n][1]) for n in names]
    assert all(m > 0 for m in ms) and abs(sum(int(phases[n][2].rstrip("%")) for n in names) - 100) <= 3
    assert "Self CPU time total" in capsys.readouterr().out  # the profiler's table
    assert gpu_profile.main(["--dry-run", "--encoders", "--rounds", "1"]) == 0
    rows = {r[0]: r for r in _rows(capsys.readouterr().out)}
    assert rows["as configured (NCHW, fp32 weights, autocast)"][2] == "1.00x"
    assert float(rows["channels_last"][3]) < 0.1  # the same latents within bf16 noise


# --------------------------------------------------------------------------------------- reference step
def test_profile_split_sorts_operators_into_compute_and_the_rest():
    raw = {"step_ms": 30.0, "self_ms": {
        "aten::convolution_backward": 10.0, "aten::mm": 5.0, "aten::mkldnn_convolution": 2.0,
        "aten::_scaled_dot_product_flash_attention_for_cpu": 1.0, "aten::bmm": 0.5, "aten::addmm": 0.5,
        "aten::native_group_norm": 1.0, "aten::native_layer_norm_backward": 0.5, "aten::_softmax": 1.0,
        "aten::copy_": 2.0, "aten::cat": 0.5, "aten::transpose": 0.25, "aten::add": 1.0, "aten::gelu_backward": 0.5,
        "aten::silu": 0.25, "autograd::engine::evaluate_function: AddmmBackward0": 0.5}}
    split = rs.split_profile(raw)
    assert split["compute"] == pytest.approx(19.0)
    assert split["norms"] == pytest.approx(1.5)
    assert split["softmax"] == pytest.approx(1.0)
    assert split["copies and layout"] == pytest.approx(2.75)
    assert split["element-wise"] == pytest.approx(1.75)
    assert split["other ops"] == pytest.approx(0.5)
    assert split["python and dispatch (unaccounted)"] == pytest.approx(30.0 - 26.5)


def test_parity_check_fails_beyond_the_tolerance():
    ours = {"output": [1.0, -2.0, 0.5], "grad_norms": {"a": 3.0, "b": 1.0}}
    close = {"output": [1.0, -2.0 + 1e-6, 0.5], "grad_norms": {"a": 3.0 * (1 + 2e-6), "b": 1.0}}
    out_diff, grad_diff = rs.check_parity(ours, close, 1e-5)
    assert out_diff == pytest.approx(0.5e-6) and grad_diff == pytest.approx(2e-6 / (1 + 2e-6))
    with pytest.raises(SystemExit, match="parity FAILED"):
        rs.check_parity(ours, {**close, "grad_norms": {"a": 3.001, "b": 1.0}}, 1e-5)
    with pytest.raises(SystemExit, match="parameter names differ"):
        rs.check_parity(ours, {**close, "grad_norms": {"a": 3.0, "c": 1.0}}, 1e-5)


def test_step_flops_charges_fused_and_plain_attention_alike():
    # The floor compares implementations by their arithmetic, so the CPU's fused attention must be counted
    # like the einsum + softmax it replaces, forward and backward (and a GEMM as 2 m n k).
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g, requires_grad=True) for _ in range(3))

    def fused():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    def plain():
        weights = torch.einsum("bhid,bhjd->bhij", q, k).mul(32**-0.5).softmax(-1)
        torch.einsum("bhij,bhjd->bhid", weights, v).sum().backward()

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        flops = rs.step_flops(fused)
    assert flops == rs.step_flops(plain) == 3 * 2 * (2 * 2 * 4 * 64 * 64 * 32)  # forward + backward of 2 GEMMs
    linear = torch.nn.Linear(16, 8, bias=False)
    assert rs.step_flops(lambda: linear(torch.randn(4, 16))) == 2 * 4 * 16 * 8


def test_floor_line_divides_the_arithmetic_by_the_gemm_rate():
    times = {"ours": [2.0, 2.2, 2.1], "reference": [2.5, 2.4, 2.6]}
    arithmetic = {"ours": {"flops": 170e9, "gemm_flops_per_s": 90e9},
                  "reference": {"flops": 170e9, "gemm_flops_per_s": 100e9}}
    line = rs.floor_line(times, arithmetic)
    # the best rate of either worker: 170 GFLOP at 100 GFLOP/s = 1.7 s, 0.68 of the reference's 2.5 s median
    assert "170.0 GFLOP per step" in line and "100.0 GFLOP/s" in line and "about 1.700 s" in line
    assert "ours 81% of it; reference 68% of it" in line and "**Floor / reference step: 0.68x**" in line
    assert rs.gemm_rate(size=64, repeats=1) > 0


@pytest.mark.slow
def test_reference_step_alternates_two_workers_and_checks_parity(capsys):
    # This repository stands in for the official checkout: the same code must agree exactly with itself.
    rs.main(["--ref", str(REPO), "--model-channels", "64", "--latent", "8", "--batch", "1", "--rounds", "1",
             "--warmup", "0", "--profile-repeats", "1", "--no-write"])
    out = capsys.readouterr().out
    rows = {r[0]: r for r in _rows(out)}
    assert float(rows["ours"][1]) > 0 and float(rows["reference"][1]) > 0
    ratio = re.search(r"\*\*ours / reference step time: ([\d.]+)x\*\* .*per round: ([\d., ]+)\)", out)
    assert ratio and len(ratio.group(2).split(",")) == 1
    assert "Parity: output 0.0e+00, gradient norms 0.0e+00" in out
    assert "1 torch thread;" in out  # the workers' count, whatever the test process runs with
    assert re.search(r"\*\*Floor / reference step: [\d.]+x\*\*", out)
    split = rows["**everything but compute**"]
    assert all(re.fullmatch(r"\*\*\d+ \(\d+%\)\*\*", cell) for cell in split[1:])


def test_reference_step_rejects_a_checkout_without_the_unet(tmp_path):
    with pytest.raises(SystemExit, match="no ldm/modules/diffusionmodules/openaimodel.py"):
        rs.run(rs.parse_args(["--ref", str(tmp_path), "--no-write"]))


# ----------------------------------------------------------------------------------- memory model, step
def test_memory_model_arithmetic():
    term = mm.LinearTerm.fit((128, 1.0e9 + 0.0625 * 2e9), (256, 1.0e9 + 0.25 * 2e9))
    assert term.fixed == pytest.approx(1e9) and term.per_sample == pytest.approx(2e9)
    assert term.at(8, 512) == pytest.approx(17e9)
    counts = mm.Counts(unet=1000, vae=100, text=10)
    enc = mm.LinearTerm(fixed=0.0, per_sample=50.0, measured={})
    small = mm.LinearTerm(fixed=10.0, per_sample=1.0, measured={})
    s = mm.Setting("x", bf16=True, checkpointing=False, zero1_world=4)
    pred = mm.predict(counts, small, enc, s, batch=8)
    held = 4 * 1000 + 4 * 1000 + 8 * 1000 / 4 + 4 * 100 + 4 * 10
    assert pred["peak"] == pytest.approx(held + max(400, 4000 + 10 + 8))  # encoders run before grads exist
    big_encoder = mm.predict(counts, small, mm.LinearTerm(0.0, 600.0, {}), s, batch=8)
    assert big_encoder["peak"] == pytest.approx(held + 4800)
    # step 1: the moments (2000 bytes) appear after the activations are gone
    first = mm.predict(counts, small, enc, s, batch=8, first_step=True)
    assert first["peak"] == pytest.approx(held - 2000 + max(400, 4000 + max(18, 2000)))
    assert mm.fits(30 * 2**30, 40e9, 0.1) == "fits" and mm.fits(36 * 2**30, 40e9, 0.1) == "**no**"
    # largest batch without ZeRO: held 16440 + max(encoder 50 b, grads 4000 + UNet 10 + b)
    capacity = 16440 + 4010 + 7 + mm.CUDA_CONTEXT
    assert mm.max_batch(counts, small, enc, mm.Setting("y", True, False), capacity, 0.0) == 7
    capacity = 16440 + 50 * 100 + mm.CUDA_CONTEXT  # past b = 82 the encoder term is the larger one
    assert mm.max_batch(counts, small, enc, mm.Setting("y", True, False), capacity, 0.0) == 100


@pytest.mark.slow
def test_full_step_peak_matches_the_memory_model_at_tiny_scale(tmp_path, capsys):
    terms = tmp_path / "terms.json"
    counts = mm.count_parameters(TINY)
    fitted = mm.measure((64, 128), mm.select("fp32-ckpt"), TINY)
    mm.save_terms(fitted, counts, terms)
    assert json.loads(terms.read_text())["counts"]["unet"] == counts.unet > 0
    full_step.main(["--config", TINY, "--resolution", "64", "--min-free-gib", "0", "--terms", str(terms),
                    "--steps", "2", "--no-write"])
    out = capsys.readouterr().out
    rows = {r[0]: r[1:] for r in _rows(out)}
    assert {"encode (2 x VAE, text)", "backward (with recompute)", "AdamW (fused)", "EMA", "step"} <= rows.keys()
    # the model (held + the larger of the encoder term and gradients + UNet term; moments at the end of
    # step 1) explains the peaks; what it leaves out is the batch, the text encoder's activations, the loss
    for row in ("**peak, step 1** (moments allocated at its end)", "**peak, later steps**"):
        assert 0.9 < float(rows[row][2]) < 1.1, out


def test_full_step_refuses_to_start_without_enough_free_memory():
    args = full_step.parse_args(["--min-free-gib", "1e9"])
    with pytest.raises(SystemExit, match="GiB available"):
        full_step.run(args, torch.device("cpu"))
