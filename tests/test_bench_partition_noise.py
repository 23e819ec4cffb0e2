"""bench/stability/partition_noise.py: the greedy chain's decisions, the probe size for 90 %."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np

from scripts import load_script


def _sym(upper: dict[tuple[int, int], float], n: int) -> np.ndarray:
    m = np.eye(n)
    for (i, j), v in upper.items():
        m[i, j] = m[j, i] = v
    return m


def test_decisions_carry_each_subsets_margin_and_follow_the_mean_chain():
    bench = load_script("bench/stability/partition_noise.py")
    # layer 0's threshold is the mean of its row: (0.9 + 0.5 ± δ)/2; layer 1 joins 0 iff
    # sim[1][0] ≥ τ_0, then layer 2 is compared with the start 0 again
    a = _sym({(0, 1): 0.90, (0, 2): 0.50, (1, 2): 0.6}, 3)
    b = _sym({(0, 1): 0.80, (0, 2): 0.70, (1, 2): 0.6}, 3)
    intervals, decisions = bench.mean_chain(np.stack([a, b]), [False] * 3)
    assert intervals == [(0, 1), (2, 2)]
    assert [(d.s, d.c) for d in decisions] == [(0, 1), (0, 2)]
    # float64 by hand: margin = sim[c][0] − (sim[0][1] + sim[0][2]) / 2
    np.testing.assert_allclose(decisions[0].margins, [0.9 - 0.7, 0.8 - 0.75], rtol=1e-12)
    np.testing.assert_allclose(decisions[1].margins, [0.5 - 0.7, 0.7 - 0.75], rtol=1e-12)
    assert math.isclose(decisions[1].mean, -0.125) and math.isclose(
        decisions[1].sd, 0.15 / math.sqrt(2)
    )


def test_follow_probability_and_needed_size_match_the_normal_model():
    bench = load_script("bench/stability/partition_noise.py")
    k, size = 4, 64
    d1 = bench.Decision(0, 1, np.array([0.03, 0.01, 0.02, 0.02]))  # mean 0.02
    d2 = bench.Decision(0, 2, np.array([-0.05, -0.02, -0.04, -0.01]))  # mean −0.03
    phi = NormalDist().cdf
    sds = [float(np.std(d.margins, ddof=1)) for d in (d1, d2)]
    means = [0.02, 0.03]

    def expected(scale: float) -> float:
        return math.prod(phi(m / (s * scale)) ** k for m, s in zip(means, sds))

    for scale in (1.0, 0.5, 0.25):
        assert math.isclose(bench.follow_probability([d1, d2], k, scale), expected(scale),
                            rel_tol=1e-12)  # fmt: skip
    result = bench.TypeResult("t", 3, 2, False, True, 1.0, [d1, d2], 0.0)
    need = bench.needed(result, k, size)
    s = size
    while expected(math.sqrt(size / s)) < 0.9:
        s *= 2
    assert need == s and need > size  # not reached at the measured size
    assert bench.needed(bench.TypeResult("t", 1, 1, True, True, 1.0, [], 0.0), k, size) == size


def test_report_on_the_stability_smoke_records(tmp_path):
    """Its 'same' column is bench/stability/stability.py's own identity of the greedy intervals."""
    stability = load_script("bench/stability/stability.py")
    table = load_script("bench/stability/stability_table.py")
    noise = load_script("bench/stability/partition_noise.py")
    stem = tmp_path / "smoke"
    stability.main(["--smoke", "--out", str(stem)])  # 2 subsets; heads × head-fits
    jsonl = stem.with_suffix(".jsonl")
    text = noise.main([str(jsonl), "--also-k", "3"])
    assert (tmp_path / "smoke-noise.txt").read_text() == text + "\n"
    assert text.count("P(≥ 90 % identical in 3 subsets)") == 4 * 2  # groups × readings
    sections = {s.splitlines()[0]: s for s in text.split("\n## ")[1:]}
    assert len(sections) == 4
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for head, fit in (("centroid", 0), ("model", 4)):
        group = [
            r for r in records if (r["probe"]["probe_head"], r["probe"]["head_fit"]) == (head, fit)
        ]
        section = sections[f"smoke, {head} head, paired seeds, head-fit {fit}, S = 4, K = 2"]
        for reading in ("raw", "signal"):
            same, total = table.identical_share(group, reading, "intervals")
            rows = [line.split() for line in section.splitlines() if line.startswith(reading + " ")]
            types = [row for row in rows if not row[1].startswith("P(")]
            assert len(types) == total
            assert sum(row[8] == "yes" for row in types) == same
            assert f"observed greedy {same}/{total}" in " ".join(" ".join(r) for r in rows)


def test_matched_lam_gives_the_greedy_granularity_and_half_never_merges():
    """dp at METHODS.md's λ = 0.5 makes every layer its own interval (block means ≤ 1); the
    matched λ gives the requested count, and just below it dp splits more."""
    bench = load_script("bench/stability/partition_noise.py")
    rng = np.random.default_rng(0)
    n = 8
    x = np.cumsum(rng.normal(size=(n, 3)), axis=0)  # neighbouring layers alike
    sim = np.exp(-0.02 * ((x[:, None] - x[None]) ** 2).sum(-1))  # entries in (0, 1], unit diagonal
    flags = [False] * n
    assert bench.dp_intervals(sim.tolist(), flags, 0.5) == [(i, i) for i in range(n)]
    for target in (2, 3, 5):
        lam = bench.matched_lam(sim, flags, target)
        assert len(bench.dp_intervals(sim.tolist(), flags, lam)) <= target
        assert len(bench.dp_intervals(sim.tolist(), flags, lam - 1e-6)) > target
        assert lam > 1.0


def test_share_reached_is_the_poisson_binomial_tail():
    """P(≥ 90 % of T types identical) against the enumeration of every outcome (float64)."""
    import itertools

    bench = load_script("bench/stability/partition_noise.py")
    margins = [[0.02, 0.03, 0.01, 0.02], [0.05, 0.02, 0.04, 0.05], [0.001, -0.002, 0.003, 0.0]]
    results = [
        bench.TypeResult(f"t{i}", 2, 1, True, True, 1.0, [bench.Decision(0, 1, np.array(m))], 0.0)
        for i, m in enumerate(margins)
    ]
    for scale_size in (64, 256, 4096):
        probs = [r.probability(4, math.sqrt(64 / scale_size)) for r in results]
        tail = 0.0
        for outcome in itertools.product((0, 1), repeat=3):
            if sum(outcome) >= 3:  # 90 % of 3 types: all three
                tail += math.prod(p if o else 1 - p for p, o in zip(probs, outcome))
        assert math.isclose(bench.share_reached(results, 4, 64, scale_size), tail, rel_tol=1e-12)
    assert 0.0 < bench.share_reached(results, 4, 64, 64) < bench.share_reached(results, 4, 64, 4096)
