"""bench/stability/signal_bias.py: the §2 signal erank sits between the true and the raw one."""

from __future__ import annotations

import numpy as np
import pytest

from scripts import load_script


def test_signal_and_noise_has_the_requested_snr():
    bench = load_script("bench/stability/signal_bias.py")
    mu, g, d = bench.signal_and_noise(200, 300, alpha=1.0, snr=4.0, seed=0)
    e = (g - mu).numpy()
    assert float(mu.norm() ** 2) / float((e**2).sum()) == pytest.approx(4.0, rel=0.05)
    assert float(d.norm()) == pytest.approx(float(np.linalg.norm(e)), rel=0.05)  # same size


def test_edge_erank_matches_numpy():
    bench = load_script("bench/stability/signal_bias.py")
    _, g, d = bench.signal_and_noise(40, 70, alpha=0.5, snr=4.0, seed=1)
    gn, dn = g.numpy(), d.numpy()
    ev = np.linalg.eigvalsh(gn @ gn.T - dn @ dn.T)
    sv = np.sqrt(np.where(ev > -ev.min(), ev, 0.0))
    p = sv[sv > 0] / sv.sum()
    assert bench.edge_erank(g, d) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)


def test_smoke_orders_true_signal_raw(capsys):
    bench = load_script("bench/stability/signal_bias.py")
    rows = bench.main(["--smoke", "--seeds", "1"])
    assert len(rows) == len(bench.ALPHAS) * len(bench.SNRS)
    for r in rows:  # noise only ever adds effective rank; subtracting D D^T removes part of it
        assert r["true"] < r["signal"] < r["raw"]
    assert "signal §2" in capsys.readouterr().out
