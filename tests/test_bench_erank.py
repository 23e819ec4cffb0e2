"""bench/speed/erank.py --smoke runs end to end and reports what it measured; no timing asserts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entrolora import GradientStats
from scripts import load_script
from test_spectral import numpy_erank


def test_bench_erank_smoke(capsys):
    bench = load_script("bench/speed/erank.py")
    rows = bench.main(["--smoke", "--seeds", "1"])
    first = next(iter(bench.load_profiles()))  # the smoke takes the first real profile
    assert [(r["shape"], r["spectrum"], r["statistic"]) for r in rows] == [
        ("1600x1300", "α 1.0", "raw"),
        ("1600x1300", "α 1.0", "signal"),
        ("1600x1300", first, "raw"),
    ]
    raw, signal, real = rows
    assert abs(raw["max_err"]) < 0.01 and abs(real["max_err"]) < 0.01  # raw: within 1 %
    assert abs(signal["max_err"]) < 0.05
    for r in rows:
        assert 1 <= r["exact"] <= 1300 and r["exact_cpu"] > 0 and r["fast_cpu"] > 0
    out = capsys.readouterr().out
    assert "load average" in out and "1600x1300" in out and "signal" in out
    assert "# real profiles at 1600x1300: 1/1 within 1 % at every seed" in out


def test_gradient_pair_has_the_documented_noise_floor():
    bench = load_script("bench/speed/erank.py")
    g, d = bench.gradient_pair(300, 200, alpha=1.0)
    # G = μ + (e₁+e₂)/2 with ‖(e₁+e₂)/2‖ ≈ ν/√64·‖μ‖ = 0.5‖μ‖, and D has the same size
    # ‖D‖ = 0.5‖μ‖ and ‖G‖² ≈ 1.25‖μ‖², so ‖D‖/‖G‖ ≈ 0.5/√1.25 ≈ 0.45
    assert 0.40 < float(d.norm() / g.norm()) < 0.50
    assert g.dtype == d.dtype == bench.torch.float32


def test_whole_model_counts_each_shape_and_keeps_small_ones_exact():
    bench = load_script("bench/speed/erank.py")
    rows = [
        dict(shape=s, alpha=1.0, statistic="raw", exact_cpu=e, fast_cpu=f)
        for s, e, f in (("4096x4096", 8.0, 1.0), ("1024x4096", 0.4, 0.3), ("14336x4096", 14.0, 2.5))
    ]
    (line,) = bench.whole_model(rows)
    exact = 32 * (2 * 8.0 + 2 * 0.4 + 3 * 14.0)  # 1881.6
    auto = 32 * (2 * 1.0 + 2 * 0.4 + 3 * 2.5)  # 329.6: 1024 is below FAST_MIN_SIDE, exact
    assert f"exact {exact:.0f} CPU s, auto {auto:.0f} CPU s, {exact / auto:.1f}×" in line
    assert "all 224 targets" in line
    assert bench.whole_model(rows[:2]) == []  # a shape missing: no total


def test_profile_matrix_has_the_profile_s_singular_values():
    bench = load_script("bench/speed/erank.py")
    sv = torch.logspace(0, -3, 50)
    g = bench.profile_matrix(sv, 80, 50, seed=1)  # same side: the profile itself
    got = np.linalg.svd(g.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(got, sv.double().numpy(), rtol=1e-4)
    wide = bench.profile_matrix(sv, 100, 400)  # 100 values from 50: log σ interpolated
    got = np.linalg.svd(wide.double().numpy(), compute_uv=False)
    x = (np.arange(100) + 0.5) / 100
    want = np.exp(np.interp(x, (np.arange(50) + 0.5) / 50, np.log(sv.double().numpy())))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_write_profiles_keeps_first_middle_and_last_layer(tmp_path):
    bench = load_script("bench/speed/erank.py")
    gen = torch.Generator().manual_seed(0)
    grads = {f"model.layers.{i}.q_proj": torch.randn(12, 20, generator=gen) for i in range(5)}
    stats = tmp_path / "tiny.safetensors"
    GradientStats.from_gradients(grads, steps=2).save(stats, keep_gradients=True)
    out = bench.write_profiles([str(stats)], tmp_path / "profiles.safetensors")
    assert list(out) == [f"tiny/model.layers.{i}.q_proj" for i in (0, 2, 4)]
    for name, sv in bench.load_profiles(tmp_path / "profiles.safetensors").items():
        want = np.linalg.svd(grads[name.split("/")[1]].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(sv.numpy(), want / want[0], rtol=1e-5)


def test_real_summary_reports_the_count_within_one_percent_and_the_worst_error():
    bench = load_script("bench/speed/erank.py")
    rows = [
        dict(shape="64x64", alpha=None, max_err=e, exact_cpu=x, fast_cpu=1.0)
        for e, x in ((0.004, 3.0), (-0.012, 5.0), (0.001, 4.0))
    ]
    rows.append(dict(shape="64x64", alpha=1.0, max_err=0.5, exact_cpu=1.0, fast_cpu=1.0))
    (line,) = bench.real_summary(rows)
    assert line == (
        "# real profiles at 64x64: 2/3 within 1 % at every seed, largest error -1.20 %, "
        "×cpu 3.0–5.0 (median 4.0)"
    )


def test_default_estimator_within_one_percent_on_real_gradients_spectra():
    """Every fifth committed profile of a real probe gradient, at a 1024² matrix (above
    FAST_RAW's Krylov dimension): the default estimator against a float64 SVD."""
    from entrolora.stats.slq import erank_estimate

    bench = load_script("bench/speed/erank.py")
    for name, sv in list(bench.load_profiles().items())[::5]:
        g = bench.profile_matrix(sv, 1024, 1024, seed=3)
        want = numpy_erank(g.double().numpy())
        assert abs(erank_estimate(g) / want - 1) < 0.01, name


def test_compare_reports_each_setting_against_the_profile(capsys):
    bench = load_script("bench/speed/erank.py")
    profiles = {"a/x": torch.logspace(0, -4, 300), "b/y": torch.linspace(1, 0.1, 300)}
    settings = [bench.parse_setting("probe_steps=8,extrapolate=0"), bench.parse_setting("")]
    rows = bench.compare(profiles, 1100, 960, settings, seeds=2)  # 960: above FAST_RAW's 896
    assert [r["name"] for r in rows] == ["a/x", "b/y"]
    for r, sv in zip(rows, profiles.values()):
        want = np.exp(np.interp(np.arange(960) + 0.5, (np.arange(300) + 0.5) * 960 / 300,
                                np.log(sv.double().numpy())))  # fmt: skip
        p = want / want.sum()
        assert r["erank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
        assert [len(e) for e in r["errors"]] == [2, 2]
        assert max(abs(x) for x in r["errors"][1]) < 0.02  # the default: within ~1 %
    # 8 steps without extrapolation: worse on the steep profile, at every seed
    assert min(map(abs, rows[0]["errors"][0])) > max(map(abs, rows[0]["errors"][1]))
    out = capsys.readouterr().out
    assert "# 0: within 1 %:" in out and "# 1: within 1 %:" in out and "CPU s median" in out


def test_parse_setting_reads_fields_as_their_defaults_types():
    bench = load_script("bench/speed/erank.py")
    p = bench.parse_setting("probes=8,lock_tol=1e-2,extrapolate=0")
    assert (p.probes, p.lock_tol, p.extrapolate, p.block) == (8, 0.01, False, 32)
    with pytest.raises(ValueError, match="'dtype' is no int, float or bool of FastErank"):
        bench.parse_setting("dtype=float64")
    with pytest.raises(ValueError, match="'probe' is no int, float or bool of FastErank"):
        bench.parse_setting("probe=8")


def test_steep_real_spectrum_keeps_the_float32_products(monkeypatch):
    """SmolLM2's last o_proj at 2048² (effective rank 11): the deflation reaches the bottom of
    the spectrum, where float32 rounding makes harmless negative Ritz values; the estimate stays
    in float32 and within 1 % of a float64 SVD."""
    from entrolora.stats import slq

    redone = []
    real = slq._needs_float64

    def spy(*args):
        redone.append(real(*args))
        return redone[-1]

    monkeypatch.setattr(slq, "_needs_float64", spy)
    bench = load_script("bench/speed/erank.py")
    profile = bench.load_profiles()["smollm2/model.layers.29.self_attn.o_proj"]
    g = bench.profile_matrix(profile, 2048, 2048)
    got = slq.erank_estimate(g)
    assert redone and not any(redone)
    assert got == pytest.approx(numpy_erank(g.double().numpy()), rel=0.01)
