"""The probe under torch.distributed: 2 gloo processes on the CPU (issue 8, item 1).

Every rank probes its own batches; every rank must return the statistics of a 1-process probe
over the union of all ranks' batches, identical on both ranks. The noise estimate's halves are
global: a batch's half is the parity of its global index ``rank + i·world``, the order in which
``entrolora.distributed.shard`` deals batches, so dealing round-robin reproduces the 1-process
probe's halves exactly.
"""

from __future__ import annotations

import pytest
import torch

import entrolora as el
from dist_utils import run_distributed
from tiny import lm_batches, tiny_llama

TARGETS = ["q_proj", "v_proj"]
FIELDS = ("mean", "std", "entropy", "erank", "sensitivity")
SIGNAL = ("noise_mean", "noise_std", "snr", "signal_std", "signal_entropy", "signal_erank")


def _summary(stats) -> dict:
    return {
        "steps": stats.steps,
        "world_size": stats.meta.get("world_size"),
        "grads": {n: g.clone() for n, g in stats.gradients.items()},
        "fields": {n: [getattr(stats[n], f) for f in FIELDS] for n in stats},
        "signal": {n: [getattr(stats[n], f) for f in SIGNAL] for n in stats},
        "rmi": {t: stats.similarity(t) for t in stats.types},
        "signal_rmi": {t: stats.similarity(t, statistics="signal") for t in stats.types},
    }


def _rank_batches(rank: int) -> list[dict]:
    """Rank 0 gets 3 batches, rank 1 gets 1 (unequal: the mean is over all 4)."""
    everything = lm_batches(4, seed=11)
    return everything[:3] if rank == 0 else everything[3:]


def _worker(rank: int, world_size: int) -> dict:
    model = tiny_llama(layers=2)  # same seed: same weights on every rank
    out = {}
    equal = lm_batches(4, seed=10)[rank::world_size]  # dealt round-robin, as eld.shard does
    out["equal"] = _summary(el.probe(model, equal, TARGETS, steps=2, progress=False))
    out["unequal"] = _summary(
        el.probe(model, _rank_batches(rank), TARGETS, steps=3, allow_fewer=True, progress=False)
    )
    # A DDP-wrapped model is probed through its inner module; DDP's own hooks stay idle.
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    wrapped = el.probe(ddp, equal, TARGETS, steps=2, progress=False)
    out["ddp"] = _summary(wrapped)

    # One rank failing must make every rank fail (nobody hangs in the all-reduce).
    def loss_fn(m, b):
        loss = m(**b).loss
        return loss * float("nan") if rank == 1 else loss

    try:
        el.probe(model, equal, TARGETS, steps=2, loss_fn=loss_fn, progress=False)
        out["failure"] = "no error"
    except ValueError as e:
        out["failure"] = str(e)
    out["requires_grad"] = all(p.requires_grad for p in model.parameters())
    return out


def _assert_same(got: dict, want: dict, exact: bool = False, signal: bool = True) -> None:
    assert got["steps"] == want["steps"]
    keys = ("fields", "signal") if signal else ("fields",)
    for key in keys:
        for n, vals in want[key].items():
            for a, b in zip(got[key][n], vals):
                if b is None:  # a reference built without weights has no sensitivity
                    continue
                assert a == b if exact else a == pytest.approx(b, rel=1e-4, abs=1e-12)
    sims = ("rmi", "signal_rmi") if signal else ("rmi",)
    for key in sims:
        for t, sim in want[key].items():
            if exact:
                assert torch.equal(got[key][t], sim)
            else:
                torch.testing.assert_close(got[key][t], sim, rtol=1e-5, atol=1e-6)
    for n, g in want["grads"].items():
        if exact:
            assert torch.equal(got["grads"][n], g)
        else:
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=2, timeout=240)


def test_every_rank_gets_the_union_statistics(results):
    model = tiny_llama(layers=2)
    union = _summary(el.probe(model, lm_batches(4, seed=10), TARGETS, steps=4, progress=False))
    for r in results:
        assert r["equal"]["world_size"] == 2
        _assert_same(r["equal"], union)
    _assert_same(results[1]["equal"], results[0]["equal"], exact=True)


def test_unequal_batch_counts_average_over_the_union(results):
    model = tiny_llama(layers=2)
    union = _summary(el.probe(model, lm_batches(4, seed=11), TARGETS, steps=4, progress=False))
    assert results[0]["unequal"]["steps"] == 4
    for r in results:
        _assert_same(r["unequal"], union, signal=False)
    _assert_same(results[1]["unequal"], results[0]["unequal"], exact=True)
    # Global indices 0, 2, 4 (rank 0) and 1 (rank 1): halves of 3 and 1 batches, weighted.
    halves = [
        el.probe(model, _rank_batches(r), TARGETS, steps=3, allow_fewer=True, progress=False)
        for r in (0, 1)
    ]
    want = el.GradientStats.from_halves(halves[0].gradients, halves[1].gradients, counts=(3, 1))
    _assert_same(results[0]["unequal"], _summary(want))


def test_ddp_wrapped_model(results):
    for r in results:
        _assert_same(r["ddp"], r["equal"], exact=True)


def test_a_failing_rank_fails_every_rank(results):
    assert "loss of batch 0 is nan" in results[1]["failure"]
    assert "failed on 1 other process(es) of 2" in results[0]["failure"]
    assert all(r["requires_grad"] for r in results)
