"""bench/stability.py --smoke runs end to end and resumes from its JSONL (issue 14)."""

from __future__ import annotations

import json
import math

import numpy as np

from scripts import load_script


def test_bench_stability_smoke(tmp_path, capsys):
    bench = load_script("bench/stability.py")
    stem = tmp_path / "smoke"
    out = bench.main(["--smoke", "--out", str(stem)])
    lines = stem.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 subsets × head-fit 0 and 4
    rec = json.loads(lines[0])
    assert set(rec) >= {"probe", "size", "snr", "raw", "signal"} and rec["size"] == 4
    assert rec["signal"]["used"] == "signal" and rec["raw"]["used"] == "raw"
    assert set(rec["raw"]["blocks"]) == set(rec["snr"])  # every probed module has a block count
    assert rec["edge"]["used"] == "edge" and set(rec["edge"]["blocks"]) == set(rec["snr"])
    table = stem.with_suffix(".txt").read_text()
    assert table == out["text"] + "\n"
    assert "E²LoRA intervals" in table and "RaLoRA blocks" in table
    assert sum(line.startswith("smoke") for line in table.splitlines()) == 6  # raw, signal, edge
    # a rerun reuses every probe: nothing is probed again
    capsys.readouterr()
    bench.main(["--smoke", "--out", str(stem)])
    assert "probed" not in capsys.readouterr().out
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 4


def test_identical_share_counts_items_equal_in_every_probe():
    bench = load_script("bench/stability.py")
    recs = [{"raw": {"blocks": {"a": 1, "b": 2}}}, {"raw": {"blocks": {"a": 1, "b": 4}}}]
    assert bench.identical_share(recs, "raw", "blocks") == (1, 2)


def test_edge_blocks_follow_the_mirrored_noise_edge_effective_rank():
    """Block count 2^floor(log2(erank / 8)) (capped at 32) of the erank computed in numpy from
    the eigenvalues of G Gᵀ − D Dᵀ above |λ_min|, for a flat and a steep synthetic gradient."""
    import entrolora as el
    from entrolora.stats import GradientStats

    bench = load_script("bench/stability.py")
    sb = load_script("bench/signal_bias.py")
    first, second, expected = {}, {}, {}
    for layer, (alpha, snr) in enumerate([(0.3, 64.0), (1.5, 4.0)]):
        _, g, d = sb.signal_and_noise(256, 256, alpha=alpha, snr=snr, seed=layer)
        name = f"model.layers.{layer}.self_attn.q_proj"
        first[name], second[name] = (g + d).float(), (g - d).float()  # G, D = their mean, half-diff
        gn, dn = g.numpy(), d.numpy()
        ev = np.linalg.eigvalsh(gn @ gn.T - dn @ dn.T)
        sv = np.sqrt(np.where(ev > -ev.min(), ev, 0.0))
        p = sv[sv > 0] / sv.sum()
        erank = float(np.exp(-(p * np.log(p)).sum()))
        expected[name] = 2 ** min(max(math.floor(math.log2(erank / 8)), 0), 5)
    stats = GradientStats.from_halves(first, second)
    blocks = bench.edge_blocks(stats)
    assert blocks == expected
    assert len(set(expected.values())) == 2  # the two spectra give different counts
    signal = {n: m.blocks for n, m in el.plan_ralora(stats).modules.items()}
    assert signal != blocks  # §2's clipped reading counts more blocks on the noisy one
