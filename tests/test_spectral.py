"""Effective rank (RaLoRA eq. 3) against a float64 numpy SVD, including hard matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrolora.stats.slq import FastErank, erank_estimate
from entrolora.stats.spectral import effective_ranks, erank_from_singular_values, singular_values


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


# -- signal effective rank (METHODS.md §2, probe noise) ----------------------------------------


def numpy_signal_erank(g: np.ndarray, d: np.ndarray) -> float:
    """Independent float64 reference: clipped eigenvalues of G Gᵀ − D Dᵀ on the smaller side."""
    g, d = np.asarray(g, dtype=np.float64), np.asarray(d, dtype=np.float64)
    m = g @ g.T - d @ d.T if g.shape[0] <= g.shape[1] else g.T @ g - d.T @ d
    sv = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None))
    if sv.sum() == 0:
        return float("nan")
    p = sv / sv.sum()
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum())


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_signal_erank_removes_noise_orthogonal_to_the_signal(shape):
    # Signal of rank 3 with equal singular values, noise in the complementary subspace of the
    # smaller side's partner: the cross terms vanish and G Gᵀ − D Dᵀ is exactly μ μᵀ.
    # (rounding leaves eigenvalues ~1e-16 whose square roots weigh ~1e-6 in the distribution)
    m, n = shape
    rng = np.random.default_rng(6)
    mu = np.zeros(shape)
    e = rng.standard_normal(shape) * 2.0
    if m <= n:
        mu[:, :5] = with_singular_values([1.0, 1.0, 1.0], m, 5, seed=7).numpy()
        e[:, :5] = 0.0
    else:
        mu[:5, :] = with_singular_values([1.0, 1.0, 1.0], 5, n, seed=7).numpy()
        e[:5, :] = 0.0
    g, d = torch.from_numpy(mu + e), torch.from_numpy(e)
    assert effective_ranks([g])[0] > 5.0  # the raw statistic sees the noise
    assert effective_ranks([g], noises=[d])[0] == pytest.approx(3.0, rel=1e-5)


def test_signal_erank_matches_numpy_with_negative_eigenvalues_clipped():
    rng = np.random.default_rng(8)
    mats, noises = [], []
    for shape in [(16, 40), (40, 16), (16, 40), (24, 24)]:
        mu = with_singular_values(np.logspace(0, -2, 6), *shape, seed=shape[0]).numpy()
        e1, e2 = rng.standard_normal((2, *shape)) * 0.05
        mats.append(torch.from_numpy(mu + (e1 + e2) / 2))
        noises.append(torch.from_numpy((e1 - e2) / 2))
    want = [numpy_signal_erank(g.numpy(), d.numpy()) for g, d in zip(mats, noises)]
    # the noise is large enough that some eigenvalues of M go negative
    g0, d0 = mats[0].numpy(), noises[0].numpy()
    assert np.linalg.eigvalsh(g0 @ g0.T - d0 @ d0.T).min() < 0
    assert effective_ranks(mats, noises=noises) == pytest.approx(want, rel=1e-9)
    chunked = effective_ranks(mats, noises=noises, max_batch_bytes=1)
    assert chunked == pytest.approx(want, rel=1e-9)
    f32 = effective_ranks([g.float() for g in mats], noises=[d.float() for d in noises])
    assert f32 == pytest.approx(want, rel=1e-4)


def test_signal_erank_zero_noise_is_the_raw_erank():
    rng = np.random.default_rng(9)
    g = torch.from_numpy(rng.standard_normal((20, 32)))
    raw = effective_ranks([g])[0]
    assert effective_ranks([g], noises=[torch.zeros_like(g)])[0] == pytest.approx(raw, rel=1e-12)


def test_signal_erank_of_pure_noise_is_nan():
    d = torch.randn(10, 14, dtype=torch.float64)
    assert math.isnan(effective_ranks([d], noises=[d])[0])


def test_signal_erank_noise_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"got 1 noise estimates for 2 gradients; pass one D"):
        effective_ranks([torch.ones(3, 4), torch.ones(3, 4)], noises=[torch.zeros(3, 4)])


def test_signal_erank_noise_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"noise estimate 0 has shape \(4, 3\) but its gradient"):
        effective_ranks([torch.ones(3, 4)], noises=[torch.zeros(4, 3)])


# -- fast estimate (deflated stochastic Lanczos quadrature) ---------------------------------------
# Accuracy on small matrices with the threshold forced low; no timing here (bench/speed/erank.py).
SMALL = FastErank(block=16, steps=6, probes=16, probe_steps=12)  # 288 product columns


def noisy_decaying(m: int, n: int, alpha: float = 1.0, noise: float = 0.5, seed: int = 0):
    """``(G, D)`` float32: a decaying rank-n/4 mean plus a noise floor and its half-difference."""
    rng = np.random.default_rng(seed)
    r = min(m, n) // 4
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    mu = (u * np.arange(1, r + 1) ** -alpha) @ v.T
    e1, e2 = rng.standard_normal((2, m, n)) * noise * np.linalg.norm(mu) / math.sqrt(2 * m * n)
    g, d = mu + (e1 + e2) / 2, (e1 - e2) / 2
    return torch.from_numpy(g).float(), torch.from_numpy(d).float()


@pytest.mark.parametrize("shape", [(1100, 960), (960, 1100)])  # side above FAST_RAW's 896
@pytest.mark.parametrize("alpha", [0.5, 1.5])
def test_fast_raw_erank_within_one_percent_of_svd(shape, alpha):
    g, _ = noisy_decaying(*shape, alpha=alpha)
    want = numpy_erank(g.double().numpy())
    got = effective_ranks([g], fast_min_side=500)[0]  # auto: the estimator above 500
    assert got == pytest.approx(want, rel=0.01)
    assert got != effective_ranks([g], method="exact")[0]  # it did take the fast path


def test_fast_raw_erank_with_small_parameters_and_several_seeds():
    g, _ = noisy_decaying(500, 400, alpha=1.0, seed=1)
    want = numpy_erank(g.double().numpy())
    for seed in range(3):
        assert erank_estimate(g, seed=seed, params=SMALL) == pytest.approx(want, rel=0.01)


def test_fast_erank_ill_conditioned_and_rank_deficient_in_float32():
    # float32 products: singular values keep an absolute accuracy ~u·σ_max, so a condition
    # number of 1e12 and a rank of 4 out of 960 (≈956 zero singular values) stay within 1 %
    hard = with_singular_values(np.logspace(0, -12, 960), 1100, 960, seed=2).float()
    low = with_singular_values([3.0, 2.0, 1.0, 0.5], 1000, 960, seed=3).float()
    for g in (hard, low):
        want = numpy_erank(g.double().numpy())
        assert effective_ranks([g], method="fast")[0] == pytest.approx(want, rel=0.01)


def test_fast_signal_erank_close_to_the_numpy_reference():
    g, d = noisy_decaying(1500, 1300, alpha=1.0, seed=4)
    want = numpy_signal_erank(g.double().numpy(), d.double().numpy())
    got = effective_ranks([g], noises=[d], method="fast")[0]
    assert got == pytest.approx(want, rel=0.03)  # the signal's kink at 0: a few per cent
    # "auto" keeps the signal exact whatever the size
    auto = effective_ranks([g], noises=[d], fast_min_side=500)[0]
    assert auto == pytest.approx(want, rel=1e-6)


def test_fast_erank_is_deterministic_given_the_seed():
    g, _ = noisy_decaying(500, 400, seed=5)
    a = erank_estimate(g, seed=7, params=SMALL)
    assert erank_estimate(g, seed=7, params=SMALL) == a
    assert erank_estimate(g, seed=8, params=SMALL) != a


def test_fast_erank_of_zero_matrix_is_nan_and_small_matrices_are_exact():
    assert math.isnan(erank_estimate(torch.zeros(500, 400), params=SMALL))
    g = torch.from_numpy(np.random.default_rng(6).standard_normal((50, 40)))
    # below the estimator's Krylov dimension it computes exactly
    assert erank_estimate(g, params=SMALL) == pytest.approx(numpy_erank(g.numpy()), rel=1e-9)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match=r"method must be 'auto', 'exact' or 'fast', got 'svd'"):
        effective_ranks([torch.ones(3, 4)], method="svd")
