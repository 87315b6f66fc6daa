"""LambdaLinearScheduler: ldm-compatible warm-up then constant, and wrong configs are rejected."""

import math

import pytest
import torch

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler


def sd_schedule(warmup=10000):
    return LambdaLinearScheduler(warm_up_steps=[warmup], cycle_lengths=[10_000_000_000_000], f_start=[1e-6],
                                 f_max=[1.0], f_min=[1.0])


def test_warmup_then_constant():
    s = sd_schedule(10000)
    assert s(0) == pytest.approx(1e-6)
    assert s(5000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert s(10000) == pytest.approx(1.0)
    assert s(123456) == pytest.approx(1.0)


def test_with_lambda_lr_gives_base_lr_times_multiplier():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sd_schedule(4).schedule)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-10)
    assert lrs[2] == pytest.approx(1e-4 * (1e-6 + (1 - 1e-6) * 0.5))
    assert lrs[4] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4)


def test_two_cycles_and_decay():
    s = LambdaLinearScheduler(warm_up_steps=[2, 2], cycle_lengths=[10, 10], f_start=[0, 0], f_max=[1, 1],
                              f_min=[0, 0.5])
    assert s(1) == pytest.approx(0.5)
    assert s(10) == pytest.approx(0.0)  # boundary belongs to the first cycle (ldm semantics)
    assert s(11) == pytest.approx(0.5)  # second cycle, local step 1 of warm-up
    assert s(15) == pytest.approx(0.5 + 0.5 * (10 - 5) / 10)


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="f_min"):
        LambdaLinearScheduler(warm_up_steps=[1], cycle_lengths=[10], f_start=[0], f_max=[1], f_min=[1, 1])


def test_cosine():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(5) == pytest.approx(0.5)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert s(1000) == pytest.approx(0.1)
