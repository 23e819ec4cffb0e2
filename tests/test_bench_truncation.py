"""bench/quality/truncation.py: one global singular-value threshold against a float64 numpy
brute force; the cut run is scored without retraining and, at its full budget, reproduces it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts import load_script
from test_data import save_tiny_model, write_csv

tr = load_script("bench/quality/truncation.py")


def numpy_truncation(deltas: dict[str, np.ndarray], budget: int):
    """Brute force: the smallest τ among the singular values whose kept units fit."""
    svd = {k: np.linalg.svd(v, full_matrices=False) for k, v in deltas.items()}
    eps = np.finfo(np.float64).eps
    tol = {k: sv.max() * max(deltas[k].shape) * eps for k, (_, sv, _) in svd.items()}
    sigmas = sorted({s for k, (_, sv, _) in svd.items() for s in sv if s > tol[k]}, reverse=True)
    best = (float("inf"), {k: 0 for k in deltas}, 0)
    for tau in sigmas:
        ranks = {k: int(((sv >= tau) & (sv > tol[k])).sum()) for k, (_, sv, _) in svd.items()}
        cost = sum(ranks[k] * sum(deltas[k].shape) for k in deltas)
        if cost <= budget:
            best = (tau, ranks, cost)
    tau, ranks, cost = best
    cut = {k: (u[:, : ranks[k]] * s[: ranks[k]]) @ vt[: ranks[k]] for k, (u, s, vt) in svd.items()}
    return tau, ranks, cost, cut


@pytest.mark.parametrize("budget", [0, 50, 333, 1000, 4000])
def test_truncate_matches_numpy(budget):
    rng = np.random.default_rng(budget)
    shapes = {"q": (12, 8), "v": (12, 8), "fc": (20, 12)}
    deltas = {}
    for k, (m, n) in shapes.items():  # rank-4 updates of different scales, like B·A
        deltas[k] = rng.normal(size=(m, 4)) @ rng.normal(size=(4, n)) * rng.uniform(0.1, 2)
    got = tr.truncate({k: torch.from_numpy(v) for k, v in deltas.items()}, budget)
    tau, ranks, cost, cut = numpy_truncation(deltas, budget)
    assert got.ranks == ranks and got.params == cost <= budget
    assert got.threshold == pytest.approx(tau)
    assert got.units == 12  # only the 4 non-zero singular values of each module
    for k in deltas:
        np.testing.assert_allclose(got.deltas[k].numpy(), cut[k], atol=1e-10)


def test_tied_singular_values_go_together():
    eye = torch.eye(4, dtype=torch.float64)
    got = tr.truncate({"a": eye, "b": 2 * eye[:, :3] @ eye[:3]}, budget=8 * 5)
    # b's three units (σ = 2) fit (24), a's four tied units (σ = 1) would need 32 more: none kept
    assert got.ranks == {"a": 0, "b": 3} and got.params == 24 and got.threshold == 2.0


def test_bad_input():
    with pytest.raises(ValueError, match="budget must be ≥ 0 parameters, got -1"):
        tr.truncate({}, -1)
    with pytest.raises(ValueError, match="ΔW of 'x' must be a matrix, got shape"):
        tr.truncate({"x": torch.ones(3)}, 5)
    with pytest.raises(ValueError, match="not a multiple of rank 16"):
        tr.budget_params(100, 16, 2)
    assert tr.budget_params(160, 16, 2) == 20


def test_evaluate_truncated_is_the_run_at_full_budget_and_smaller_below(tmp_path):
    from entrolora import train as T

    model = save_tiny_model(tmp_path, "bert")
    cfg = T.TrainConfig(model=str(model), data=str(write_csv(tmp_path / "d.csv", 40)), epochs=1,
                        batch_size=8, r=4, lr=2e-2, method="lora", output=str(tmp_path / "run"),
                        progress=False, report=False)  # fmt: skip
    run = T.train_run(cfg)
    full = tr.evaluate_truncated(run.output, 4, tmp_path / "full")
    assert full["eval_loss"] == pytest.approx(run.metrics["eval_loss"], rel=1e-5)
    assert full["accuracy"] == run.metrics["accuracy"]
    assert full["trainable_params"] == run.metrics["trainable_params"]
    half = tr.evaluate_truncated(run.output, 2, tmp_path / "half")
    assert half["trainable_params"] <= half["budget_params"] == run.metrics["trainable_params"] // 2
    assert half["test_examples"] == run.metrics["test_examples"]
    assert (tmp_path / "half" / "metrics.json").is_file()
