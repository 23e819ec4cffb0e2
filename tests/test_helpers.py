"""The one-per-job helpers: ``inject.unwrap`` (every wrapper), ``kaiming_uniform`` (the library's
init, the same draw as the formula) and ``progress.progress_bar``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from entrolora.adapters.base import kaiming_uniform
from entrolora.adapters.inject import unwrap
from entrolora.progress import NoBar, progress_bar


class DeepSpeedEngine(nn.Module):  # stands in for deepspeed's engine (matched by class name)
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_unwrap_every_wrapper_and_nesting():
    net = nn.Sequential(nn.Linear(4, 4))
    assert unwrap(net) is net
    assert unwrap(nn.DataParallel(net)) is net
    assert unwrap(torch.compile(net)) is net  # OptimizedModule keeps it at _orig_mod
    assert unwrap(DeepSpeedEngine(torch.compile(nn.DataParallel(net)))) is net


def test_unwrap_ddp(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        net = nn.Linear(3, 3)
        ddp = nn.parallel.DistributedDataParallel(net)
        assert unwrap(ddp) is net and unwrap(torch.compile(ddp)) is net
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(8, 384), (384, 8), (3, 5), (4, 2, 96)])
@pytest.mark.parametrize("seed", [0, 7])
def test_kaiming_uniform_is_the_formula_draw(shape, seed):
    """Bit-identical to U(−1/√fan_in, 1/√fan_in) as ``(2·rand − 1)/√fan_in`` (fan_in: last dim),
    the hand-written init it replaced, so seeded adapters are unchanged."""
    got = kaiming_uniform(shape, shape[-1], torch.Generator().manual_seed(seed))
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(got, (u * 2 - 1) * (1.0 / math.sqrt(shape[-1])))


def test_kaiming_uniform_vera_bound():
    """``a = 0``: VeRA's and peft's bound √(6/fan_in) (√6 larger than LoRA's)."""
    g = torch.Generator().manual_seed(3)
    got = kaiming_uniform((64, 16), 16, g, a=0.0)
    u = torch.rand((64, 16), generator=torch.Generator().manual_seed(3)).double()
    want = (u * 2 - 1) * math.sqrt(6 / 16)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7)
    assert got.abs().max() <= math.sqrt(6 / 16)


def test_progress_bar_disabled_is_silent(capsys):
    bar = progress_bar(10, "x", enabled=False)
    assert isinstance(bar, NoBar)
    bar.update(3)
    bar.set_postfix(loss="1")
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_progress_bar_counts(capsys):
    bar = progress_bar(4, "train lora", enabled=True)
    for _ in range(4):
        bar.update(1)
    assert bar.n == 4
    bar.close()
    assert "train lora" in capsys.readouterr().err
