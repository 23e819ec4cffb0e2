"""bench/stability/stability.py --smoke runs end to end and resumes from its JSONL (issue 14)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from scripts import load_script


def test_bench_stability_smoke(tmp_path, capsys):
    bench = load_script("bench/stability/stability.py")
    stem = tmp_path / "smoke"
    out = bench.main(["--smoke", "--out", str(stem)])
    lines = stem.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == 8  # 2 subsets × centroid and loaded head × head-fit 0 and 4
    rec = json.loads(lines[0])
    assert rec["probe"]["probe_head"] == "centroid"
    assert set(rec) >= {"probe", "size", "snr", "raw", "signal"} and rec["size"] == 4
    assert rec["signal"]["used"] == "signal" and rec["raw"]["used"] == "raw"
    assert set(rec["raw"]["blocks"]) == set(rec["snr"])  # every probed module has a block count
    assert rec["edge"]["used"] == "edge" and set(rec["edge"]["blocks"]) == set(rec["snr"])
    table = stem.with_suffix(".txt").read_text()
    assert table == out["text"] + "\n"
    assert "E²LoRA intervals" in table and "RaLoRA blocks" in table and "ranks ±1" in table
    assert all(len(x) == len(rec["signal"]["ranks"][t]) for t, x in rec["signal"]["shares"].items())
    shares = load_script("bench/stability/rank_noise.py").records_table(str(stem) + ".jsonl")
    assert len(shares.splitlines()) >= 2 + len(rec["signal"]["shares"])
    rows = [line for line in table.splitlines() if line.startswith("smoke")]
    assert len(rows) == 16  # (2 heads × 2 head-fits) × raw, signal, greedy (signal), edge
    assert {row.split()[4] for row in rows} == {"centroid", "model"}
    # a rerun reuses every probe: nothing is probed again
    capsys.readouterr()
    bench.main(["--smoke", "--out", str(stem)])
    assert "probed subset" not in capsys.readouterr().out
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 8
    # the table alone, from the JSONL: the same rows, nothing probed
    again = bench.main(["--smoke", "--out", str(stem), "--table-only"])
    assert "probed subset" not in capsys.readouterr().out
    assert [x for x in again["text"].splitlines() if x.startswith("smoke")] == rows


def test_bench_stability_whole_probes_through_the_public_api(tmp_path):
    """``--whole`` (issue 33): one el.probe per subset with its defaults, so the gate has the
    probe's moment noise: the signal reading is gated, ``greedy`` is not, margin sds kept."""
    bench = load_script("bench/stability/stability.py")
    stem = tmp_path / "whole"
    bench.main(["--smoke", "--whole", "--out", str(stem)])
    recs = [json.loads(x) for x in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert len(recs) == 8 and all(r["probe"]["whole"] for r in recs)  # as --smoke's passes
    rec = recs[0]
    assert rec["probe"]["probe_head"] == "centroid" and rec["probe"]["head_fit"] == 0
    assert rec["signal"]["boundaries"] == "significant"
    assert rec["greedy"]["boundaries"] == "greedy" and rec["greedy"]["used"] == "signal"
    for t, sim in rec["signal"]["similarity"].items():
        sd = np.array(rec["signal"]["margin_sd"][t])
        assert sd.shape == (len(sim), len(sim)) and np.isfinite(sd).all()
    assert set(rec["signal"]["undecided"]) == set(rec["signal"]["intervals"])


def test_records_written_before_the_probe_head_option_read_as_the_loaded_head():
    bench = load_script("bench/stability/stability.py")
    old = {"model": "minilm", "steps": 64, "subset": 1, "seed": 1, "head_fit": 0,
           "batch_size": 32, "max_length": 64, "block": 8}  # fmt: skip
    assert bench.Probe(**old).probe_head == "model"
    table = load_script("bench/stability/stability_table.py")
    assert table._group({"probe": old, "size": 64, "seeds": "paired"})[3] == "model"


def test_identical_share_counts_items_equal_in_every_probe():
    bench = load_script("bench/stability/stability_table.py")
    recs = [{"raw": {"blocks": {"a": 1, "b": 2}}}, {"raw": {"blocks": {"a": 1, "b": 4}}}]
    assert bench.identical_share(recs, "raw", "blocks") == (1, 2)


def test_edge_blocks_follow_the_mirrored_noise_edge_effective_rank():
    """Block count 2^floor(log2(erank / 8)) (capped at 32) of the erank computed in numpy from
    the eigenvalues of G Gᵀ − D Dᵀ above |λ_min|, for a flat and a steep synthetic gradient."""
    import entrolora as el
    from entrolora.stats import GradientStats

    bench = load_script("bench/stability/stability.py")
    sb = load_script("bench/stability/signal_bias.py")
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


def test_a_worker_pass_records_what_the_serial_pass_does():
    """``--jobs`` runs ``worker_pass`` in spawned processes: it builds its own setup and returns
    the same records (plans, SNRs, similarity matrices) as the pass run in the parent."""
    bench = load_script("bench/stability/stability.py")
    args = bench.parse(["--smoke"])
    probe, _ = bench.passes(args, "smoke", 256)[1]
    load, batches, targets = bench.setup(args)
    serial = bench.run_pass(probe, args.sizes, load, batches, targets, args)
    bench._WORKER.clear()
    worker = bench.worker_pass(probe, args)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in serial]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in worker] == strip
    sim = strip[0]["signal"]["similarity"]
    assert set(sim) == {"bert.encoder.layer.*.attention.self.query",
                        "bert.encoder.layer.*.attention.self.value"}  # fmt: skip
    assert all(len(m) == 3 and m[0][0] == 1.0 for m in sim.values())  # 3 layers, unit diagonal


def test_the_pool_head_is_one_centroid_for_every_subset_and_seed():
    """``--probe-head pool``: the centroid of all K subsets' batches, so a subset's gradients
    do not depend on the seed, and differ from those through the subset's own centroid."""
    bench = load_script("bench/stability/stability.py")
    args = bench.parse(["--smoke"])
    args.probe_head = "pool"
    load, batches, targets = bench.setup(args)
    probe = bench.passes(args, "smoke", len(batches))[1][0]  # subset 1, seed 1
    assert (probe.subset, probe.seed, probe.probe_head) == (1, 1, "pool")

    def grads(p):
        return bench.block_means(p, load, batches, targets, args)[0]

    pooled = grads(probe)
    for other in (replace(probe, seed=0), replace(probe, probe_head="centroid")):
        g = grads(other)
        same = all(torch.equal(g[n], pooled[n]) for n in g)
        assert same == (other.probe_head == "pool")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "12"], r"--steps must be multiples of 2·--block = 16; got \[12\]"),
        (["--subsets", "5", "--steps", "64"],
         r"5 disjoint subsets of 64 batches need 320 batches; the training split has 256"),
        (["--seeds", "random"], r"--seeds takes paired and/or fixed, got 'random'"),
        (["--probe-head", "fitted"],
         r"--probe-head takes centroid, model and/or pool, got 'fitted'"),
    ],
)  # fmt: skip
def test_bad_arguments_stop_with_a_message(argv, message):
    bench = load_script("bench/stability/stability.py")
    with pytest.raises(SystemExit, match=message):
        args = bench.parse(argv)
        bench.passes(args, "minilm", 256)


def test_rank_noise_gated_rounding_and_smoke():
    """rank_noise.py: its gate hands a unit within noise to the lower rank, is largest remainder
    without noise, and the simulation runs (--smoke)."""
    from entrolora.planners.e2lora import largest_remainder

    bench = load_script("bench/stability/rank_noise.py")
    x = [5.49, 10.51]  # largest remainder gives the last unit to the second (.51 > .49)
    assert largest_remainder([v / 16 for v in x], 16) == [5, 11]
    assert bench.gated_rounding(x, 0.0, 2.0) == [5, 11]
    assert bench.gated_rounding(x, 0.1, 2.0) == [6, 10]  # 0.02 apart, sd of the gap 0.14
    rng = np.random.default_rng(1)
    for _ in range(50):
        fr = rng.dirichlet(np.ones(4))
        x = list(fr * 24)
        if min(x) >= 1:
            assert bench.gated_rounding(x, 0.0, 2.0) == largest_remainder(list(fr), 24)
    text = bench.main(["--smoke"])
    assert "largest remainder" in text and len(text.splitlines()) == 6 + 9


def test_stats_dir_replans_without_probing_and_z_sweep(tmp_path):
    """--whole --stats-dir saves each pass's statistics; a rerun into a new --out plans from them
    (the same plans, the probe's recorded time) and z_sweep.py reads the folder."""
    bench = load_script("bench/stability/stability.py")
    folder = tmp_path / "stats"
    first = bench.main(
        ["--smoke", "--whole", "--stats-dir", str(folder), "--out", str(tmp_path / "a")]
    )
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 8  # 2 subsets × 2 heads × 2 head-fit settings
    stamp = [f.stat().st_mtime_ns for f in files]
    again = bench.main(
        ["--smoke", "--whole", "--stats-dir", str(folder), "--out", str(tmp_path / "b")]
    )
    assert [f.stat().st_mtime_ns for f in files] == stamp  # nothing probed or written again
    for a, b in zip(first["records"], again["records"]):
        assert a["seconds"] == b["seconds"] and a["signal"]["ranks"] == b["signal"]["ranks"]
        assert a["signal"]["intervals"] == b["signal"]["intervals"]
    text = load_script("bench/stability/z_sweep.py").main([str(folder), "--z", "0,2"])
    assert len(text.splitlines()) == 3 + 2 and "intervals identical" in text
