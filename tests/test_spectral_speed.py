"""Speed paths of spectral.py and slq.py: both statistics in one pass; float32 where exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrolora.stats import slq
from entrolora.stats.spectral import effective_ranks, raw_and_signal_eranks


def numpy_eranks(g: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """Independent float64 reference: (raw, signal) effective ranks from the smaller-side Grams."""
    g, d = g.astype(np.float64), d.astype(np.float64)
    wide = g.shape[0] <= g.shape[1]
    a = g @ g.T if wide else g.T @ g
    m = a - (d @ d.T if wide else d.T @ d)
    out = []
    for gram in (a, m):
        sv = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
        p = sv[sv > 0] / sv.sum()
        out.append(math.exp(-(p * np.log(p)).sum()) if sv.sum() > 0 else float("nan"))
    return out[0], out[1]


def pairs(seed: int = 0):
    """Gradients of three shapes (two of one shape), float32, with noise estimates."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    noises = [0.7 * torch.randn(s, generator=gen) for s in shapes]
    grads[3] = grads[3][:, :3] @ torch.randn(3, 16, generator=gen)  # rank 3: clipped signal
    return grads, noises


def test_joint_equals_two_separate_calls():
    grads, noises = pairs()
    raw, signal = raw_and_signal_eranks(grads, noises)
    assert raw == effective_ranks(grads)
    assert signal == effective_ranks(grads, noises)


def test_joint_matches_numpy_and_chunking():
    grads, noises = pairs(1)
    want = [numpy_eranks(g.numpy(), d.numpy()) for g, d in zip(grads, noises)]
    for kwargs in ({}, {"max_batch_bytes": 1}, {"device": "cpu"}):
        raw, signal = raw_and_signal_eranks(grads, noises, **kwargs)
        # rel 1e-6: the rank-3 matrix's zero eigenvalues come out as ±1e-16·λ_max, whose
        # square roots differ between LAPACKs
        assert raw == pytest.approx([w[0] for w in want], rel=1e-6)
        assert signal == pytest.approx([w[1] for w in want], rel=1e-6, nan_ok=True)


def test_joint_uses_the_estimator_for_the_raw_statistic_above_the_threshold():
    # a matrix above the estimator's Krylov dimension, so that it really estimates
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(500, 600, generator=gen) * torch.logspace(0, -2, 600)
    d = 0.1 * torch.randn(500, 600, generator=gen)
    raw, signal = raw_and_signal_eranks([g], [d], fast_min_side=400, seed=3)
    assert raw == effective_ranks([g], fast_min_side=400, seed=3)
    assert signal == effective_ranks([g], [d], method="exact")


def test_joint_checks_its_inputs():
    with pytest.raises(ValueError, match="got 1 noise estimates for 2 gradients"):
        raw_and_signal_eranks([torch.ones(3, 4)] * 2, [torch.zeros(3, 4)])


# -- when the estimator's float32 products are redone in float64 ---------------------------------
def test_float32_kept_for_a_noise_floor_and_redone_for_a_rank_deficient_matrix(monkeypatch):
    redone = []
    real = slq._needs_float64

    def spy(*args):
        out = real(*args)
        redone.append(out)
        return out

    monkeypatch.setattr(slq, "_needs_float64", spy)
    gen = torch.Generator().manual_seed(4)
    # square: the noise floor's singular values reach down to 0 (a hard edge), all real
    floor = torch.randn(960, 960, generator=gen)  # sides above FAST_RAW's Krylov dimension
    low = torch.randn(1000, 4, generator=gen) @ torch.randn(4, 960, generator=gen)  # rank 4
    for g, want_redo in ((floor, False), (low, True)):
        redone.clear()
        got = slq.erank_estimate(g)
        assert any(redone) == want_redo
        want = numpy_eranks(g.numpy(), np.zeros(g.shape, dtype=np.float32))[0]
        assert got == pytest.approx(want, rel=0.01)


def test_rounding_visible_reads_negative_nodes_of_the_raw_gram():
    # a Lanczos-like matrix with positive nodes only: no rounding visible
    positive = torch.diag(torch.tensor([4.0, 1.0, 0.25, 1e-6], dtype=torch.float64))
    assert not slq._rounding_visible(torch.linalg.eigh(positive), 4)
    # nodes at ±1e-8·λ_max carrying most of the weight: a rank-deficient G's zeros
    tiny = torch.diag(torch.tensor([1.0, 1e-8, -1e-8, 2e-8], dtype=torch.float64))
    assert slq._rounding_visible(torch.linalg.eigh(tiny), 4)


def test_transposed_copy_in_slabs_equals_the_plain_copy():
    x = torch.randn(130, 301, generator=torch.Generator().manual_seed(9))  # not multiples of 64
    got = slq._contiguous(x.mT)
    assert got.is_contiguous() and torch.equal(got, x.mT.contiguous())
    assert slq._contiguous(x) is x  # already contiguous: no copy


def test_block_lanczos_keeps_a_breakdown_in_the_deflated_complement():
    gen = torch.Generator().manual_seed(0)
    k = 200
    y = torch.linalg.qr(torch.randn(k, 10, generator=gen, dtype=torch.float64))[0]
    u = torch.randn(k, 3, generator=gen, dtype=torch.float64)
    u = u - y @ (y.mT @ u)
    a = u @ u.mT  # rank 3, in Y's complement: a block of 4 breaks down at once
    start = slq._orthonormal_block(k, 4, gen, "cpu", y)
    _, kept, _ = slq._block_lanczos(lambda v: a @ v, start, 5, deflate=y)
    _, loose, _ = slq._block_lanczos(lambda v: a @ v, start, 5)
    assert (y.mT @ kept).abs().max() < 1e-10
    assert (y.mT @ loose).abs().max() > 1e-3  # QR's completion is arbitrary without deflate


def test_block_lanczos_with_deflate_runs_on_the_projected_operator():
    # Y folded into the reorthogonalisation gives the Lanczos matrix of (I − YYᵀ) A (I − YYᵀ)
    gen = torch.Generator().manual_seed(1)
    k = 120
    x = torch.randn(k, k, generator=gen, dtype=torch.float64)
    a = x @ x.mT
    y = torch.linalg.qr(torch.randn(k, 7, generator=gen, dtype=torch.float64))[0]
    proj = torch.eye(k, dtype=torch.float64) - y @ y.mT
    start = slq._orthonormal_block(k, 4, gen, "cpu", y)
    folded, _, _ = slq._block_lanczos(lambda v: a @ v, start, 6, passes=1, deflate=y)
    explicit, _, _ = slq._block_lanczos(lambda v: proj @ (a @ (proj @ v)), start, 6, passes=1)
    assert torch.allclose(folded, explicit, atol=1e-9 * a.norm())


def test_block_lanczos_matrix_is_the_operator_on_its_orthonormal_basis():
    # independent check (numpy float64): Qᵀ Q = I and T = Qᵀ A Q
    gen = torch.Generator().manual_seed(2)
    k = 90
    x = torch.randn(k, k, generator=gen, dtype=torch.float64)
    a = x @ x.mT
    start = slq._orthonormal_block(k, 3, gen, "cpu")
    t, basis, _ = slq._block_lanczos(lambda v: a @ v, start, 5)
    q, an = basis.numpy(), a.numpy()
    assert np.allclose(q.T @ q, np.eye(15), atol=1e-12)
    assert np.allclose(t.numpy(), q.T @ an @ q, atol=1e-10 * np.abs(an).max())


def test_gram_op_is_the_gram_difference_times_the_block():
    gen = torch.Generator().manual_seed(3)
    g, d = (torch.randn(70, 50, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    got = slq._gram_op(g, d)(v)
    gn, dn = g.numpy(), d.numpy()
    assert np.allclose(got.numpy(), (gn.T @ gn - dn.T @ dn) @ v.numpy(), rtol=1e-10, atol=1e-10)
    assert got.mT.is_contiguous()  # the block's rows, as the Lanczos basis holds them
