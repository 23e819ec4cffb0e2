"""bench/speed/probe.py --smoke runs end to end (so the benchmark cannot rot); no timing asserts."""

from __future__ import annotations

from scripts import load_script


def test_bench_probe_smoke(capsys):
    bench = load_script("bench/speed/probe.py")
    tiny = "--layers 2 --hidden 32 --intermediate 64 --heads 4 --kv-heads 2 --vocab 64"
    tiny += " --steps 2 --repeats 1"
    out = bench.main(["--smoke", "--device", "cpu", *tiny.split()])
    assert out["modules"] == 8  # q, k, v, o of 2 layers
    assert out["shape"] == "toy" and out["config"].seq == 16 and out["config"].dtype == "fp32"
    for key in ("plain_s", "probe_s", "probe_offload_s", "stats_s", "erank_s", "signal_erank_s"):
        assert out[key] > 0
    assert all(len(v) == 1 for v in out["runs"].values())  # one interleaved round each
    assert out["peak_plain_mib"] is None  # no GPU: reported as n/a, never invented
    text = capsys.readouterr().out
    for line in (
        "plain fwd+bwd x S",
        "probe offload=None",
        'probe offload="cpu"',
        "statistics alone",
        "effective ranks alone",
        "n/a (CPU)",
    ):
        assert line in text


def test_bench_probe_shapes_come_from_bench_shapes():
    bench = load_script("bench/speed/probe.py")
    cfg, args = bench.parse(["--shape", "smollm2", "--device", "cpu"])
    assert (cfg.layers, cfg.hidden, cfg.intermediate, cfg.heads, cfg.kv_heads) == (
        30, 576, 1536, 9, 3,
    )  # fmt: skip
    assert (cfg.batch, cfg.seq, cfg.dtype, args.device) == (2, 64, "fp32", "cpu")
