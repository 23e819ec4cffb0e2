"""bench/stability/noise_shape.py: the share of ‖M‖²_F in the top eigenvalues of M Mᵀ (numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts import load_script


def test_top_share_matches_numpy():
    bench = load_script("bench/stability/noise_shape.py")
    m = np.random.default_rng(0).standard_normal((30, 50)) * np.linspace(3, 0.1, 50)
    ev = np.linalg.eigvalsh(m @ m.T)[::-1]
    assert bench.top_share(torch.from_numpy(m)) == pytest.approx(ev[:10].sum() / ev.sum(), 1e-9)
    assert bench.top_share(torch.from_numpy(m), top=30) == pytest.approx(1.0)
