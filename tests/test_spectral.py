"""Effective rank (RaLoRA eq. 3) against a float64 numpy SVD, including hard matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrolora.spectral import effective_ranks, erank_from_singular_values, singular_values


def numpy_erank(g: np.ndarray) -> float:
    sv = np.linalg.svd(np.asarray(g, dtype=np.float64), compute_uv=False)
    p = sv / sv.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum())


def with_singular_values(sv, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float64 ``m × n`` matrix with the given singular values (random orthogonal factors)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.zeros((m, n))
    s[: len(sv), : len(sv)] = np.diag(sv)
    return torch.from_numpy(u @ s @ v.T)


@pytest.mark.parametrize("shape", [(16, 16), (12, 40), (40, 12)])
def test_equal_singular_values_give_the_rank(shape):
    k = min(shape)
    g = with_singular_values(np.full(k, 0.3), *shape)
    assert effective_ranks([g])[0] == pytest.approx(k, rel=1e-9)


def test_rank_deficient_matrix():
    g = with_singular_values([2.0, 2.0, 2.0, 2.0], 32, 24, seed=1)  # rank 4 of 24
    assert effective_ranks([g])[0] == pytest.approx(4.0, rel=1e-6)
    # float32 storage, as the probe keeps gradients
    assert effective_ranks([g.float()])[0] == pytest.approx(4.0, rel=1e-4)


def test_rank_one():
    u, v = torch.randn(20, 1, dtype=torch.float64), torch.randn(1, 30, dtype=torch.float64)
    assert effective_ranks([u @ v])[0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ill_conditioned_within_one_percent_of_svd(dtype):
    sv = np.logspace(0, -12, 48)  # condition number 1e12
    g = with_singular_values(sv, 64, 48, seed=2).to(dtype)
    want = numpy_erank(g.double().numpy())
    assert effective_ranks([g])[0] == pytest.approx(want, rel=0.01)


def test_matches_svd_on_random_and_decaying_spectra():
    rng = np.random.default_rng(3)
    mats = [
        torch.from_numpy(rng.standard_normal((24, 40))),
        torch.from_numpy(rng.standard_normal((40, 24)) * np.logspace(0, -6, 24)),
        with_singular_values(np.logspace(0, -9, 30) ** 2, 30, 30, seed=4),
    ]
    got = effective_ranks(mats)
    for g, e in zip(mats, got):
        assert e == pytest.approx(numpy_erank(g.numpy()), rel=0.01)


def test_batching_keeps_input_order_and_chunking_changes_nothing():
    rng = np.random.default_rng(5)
    shapes = [(8, 8), (8, 16), (8, 8), (16, 8), (8, 16), (8, 8)]
    mats = [torch.from_numpy(rng.standard_normal(s) * (i + 1)) for i, s in enumerate(shapes)]
    want = [numpy_erank(m.numpy()) for m in mats]
    assert effective_ranks(mats) == pytest.approx(want, rel=1e-9)
    assert effective_ranks(mats, max_batch_bytes=1) == pytest.approx(want, rel=1e-9)
    assert effective_ranks(mats, device="cpu") == pytest.approx(want, rel=1e-9)


def test_zero_matrix_is_nan_and_others_unaffected():
    got = effective_ranks([torch.zeros(4, 6), torch.eye(4, 6)])
    assert math.isnan(got[0]) and got[1] == pytest.approx(4.0)


def test_non_2d_is_an_error():
    with pytest.raises(ValueError, match=r"needs 2-D matrices, got shape \(2, 3, 4\)"):
        effective_ranks([torch.zeros(2, 3, 4)])


def test_singular_values_descending():
    g = with_singular_values([3.0, 2.0, 1.0], 5, 4)
    sv = singular_values(g[None])[0]
    np.testing.assert_allclose(sv.numpy(), [3.0, 2.0, 1.0, 0.0], atol=1e-7)
    assert erank_from_singular_values(torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(2.0)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    rank=st.integers(1, 12),
    scale=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**16),
)
def test_erank_between_one_and_rank(m, n, rank, scale, seed):
    rank = min(rank, m, n)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, n, generator=gen, dtype=torch.float64)
    g = (a @ b) * scale
    e = effective_ranks([g])[0]
    true_rank = int(np.linalg.matrix_rank(g.numpy()))
    assert 1.0 - 1e-9 <= e <= true_rank * (1 + 1e-6) + 1e-6
    assert e == pytest.approx(numpy_erank(g.numpy()), rel=0.01)
