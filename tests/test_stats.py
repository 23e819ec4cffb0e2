"""GradientStats on synthetic gradients against independent float64 numpy (METHODS.md §2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import reference_methods as ref
from entrolora.stats import GradientStats, ModuleStats

K = 0.5 * math.log(2 * math.pi) + 0.5
TYPE = "model.layers.*.self_attn.q_proj"


def synthetic(n: int = 5, shape=(6, 10), seed: int = 0, zero: tuple[int, ...] = ()):
    """``{name: G}``: layer ``i`` has its own mean and std; layers in ``zero`` are all-zero."""
    rng = np.random.default_rng(seed)
    grads = {}
    for i in range(n):
        g = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, -2) + rng.uniform(-1e-4, 1e-4)
        if i in zero:
            g = np.zeros(shape)
        grads[f"model.layers.{i}.self_attn.q_proj"] = torch.from_numpy(g)
    return grads


def np_entropy(a: np.ndarray) -> float:
    return math.log(a.std()) + K


def np_rmi(grads: dict, scale: str) -> np.ndarray:
    """E²LoRA eq. 3 with the joint entropy of the concatenated arrays (no pooled moments)."""
    gs = [g.numpy().astype(np.float64).ravel() for g in grads.values()]
    live = [g.std() > 0 for g in gs]
    if scale == "reference":
        c = 1e-3 / math.exp(np.mean([math.log(g.std()) for g, ok in zip(gs, live) if ok]))
        gs = [g * c for g in gs]
    n = len(gs)
    out = np.eye(n)
    for i in range(n):
        for j in range(n):
            if i == j or not (live[i] and live[j]):
                continue
            hi, hj = np_entropy(gs[i]), np_entropy(gs[j])
            hij = np_entropy(np.concatenate([gs[i], gs[j]]))
            out[i, j] = (hi + hj - hij) / min(hi, hj)
    return out


def np_pairwise(grads: dict, kind: str) -> np.ndarray:
    gs = [g.numpy().astype(np.float64).ravel() for g in grads.values()]
    n = len(gs)
    out = np.eye(n)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a, b = gs[i], gs[j]
            if kind == "cosine":
                out[i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            elif kind == "l1":
                out[i, j] = 1 / (1 + np.abs(a - b).mean())
            elif kind == "l2":
                out[i, j] = 1 / (1 + np.linalg.norm(a - b) / math.sqrt(a.size))
            else:
                mi, si, mj, sj = a.mean(), a.std(), b.mean(), b.std()

                def kl(m1, s1, m2, s2):
                    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5

                out[i, j] = math.exp(-0.5 * (kl(mi, si, mj, sj) + kl(mj, sj, mi, si)))
    return out


def test_module_statistics_match_numpy():
    grads = synthetic()
    rng = np.random.default_rng(1)
    weights = {n: torch.from_numpy(rng.standard_normal(tuple(g.shape))) for n, g in grads.items()}
    stats = GradientStats.from_gradients(grads, weights, steps=4)
    assert stats.steps == 4 and len(stats) == 5
    for name, g in grads.items():
        a, w = g.numpy(), weights[name].numpy()
        s = stats[name]
        assert s.shape == (6, 10) and s.numel == 60 and s.d_out == 6 and s.d_in == 10
        assert s.mean == pytest.approx(a.mean(), rel=1e-12, abs=1e-18)
        assert s.std == pytest.approx(a.std(), rel=1e-12)
        assert s.entropy == pytest.approx(np_entropy(a), abs=1e-12)
        sv = np.linalg.svd(a, compute_uv=False)
        p = sv / sv.sum()
        assert s.erank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert s.sensitivity == pytest.approx(np.abs(w * a).mean(), rel=1e-12)
        assert (s.module_type, s.layer) == (TYPE, int(name.split(".")[2]))


def test_known_entropy_and_erank():
    g = torch.eye(8, dtype=torch.float64)  # 8 equal singular values
    stats = GradientStats.from_gradients({"blocks.0.fc": g})
    s = stats["blocks.0.fc"]
    assert s.erank == pytest.approx(8.0)
    std = math.sqrt(1 / 8 - 1 / 64)  # entries 1 (8 of 64) and 0
    assert s.entropy == pytest.approx(math.log(std) + K)
    assert s.sensitivity is None


def test_types_order_layers_numerically():
    grads = {f"model.layers.{i}.mlp.up_proj": torch.randn(2, 3) for i in (10, 2, 1)}
    grads["model.layers.0.self_attn.q_proj"] = torch.randn(2, 2)
    stats = GradientStats.from_gradients(grads)
    assert stats.types == {
        "model.layers.*.mlp.up_proj": [f"model.layers.{i}.mlp.up_proj" for i in (1, 2, 10)],
        "model.layers.*.self_attn.q_proj": ["model.layers.0.self_attn.q_proj"],
    }
    assert "model.layers.2.mlp.up_proj" in stats
    assert list(stats)[0] == "model.layers.1.mlp.up_proj"  # ordered by type, then layer
    with pytest.raises(KeyError, match="no statistics for module 'nope'"):
        stats["nope"]


@pytest.mark.parametrize("scale", ["reference", "raw"])
def test_rmi_matches_concatenation_reference(scale):
    grads = synthetic(seed=3)
    sim = GradientStats.from_gradients(grads).similarity(TYPE, "rmi", rmi_scale=scale)
    np.testing.assert_allclose(sim.numpy(), np_rmi(grads, scale), atol=1e-9)
    assert torch.equal(sim, sim.T)


def test_rmi_reference_scale_is_invariant_raw_is_not():
    grads = synthetic(seed=4)
    base = GradientStats.from_gradients(grads)
    for factor in (2.0, 1000.0):
        scaled = GradientStats.from_gradients({n: g * factor for n, g in grads.items()})
        np.testing.assert_allclose(
            scaled.similarity(TYPE).numpy(), base.similarity(TYPE).numpy(), atol=1e-9
        )
        raw = scaled.similarity(TYPE, rmi_scale="raw").numpy()
        assert not np.allclose(raw, base.similarity(TYPE, rmi_scale="raw").numpy(), atol=1e-3)
        np.testing.assert_allclose(
            raw, np_rmi({n: g * factor for n, g in grads.items()}, "raw"), atol=1e-9
        )


@pytest.mark.parametrize("kind", ["cosine", "l1", "l2", "kl"])
def test_other_similarities_match_numpy(kind):
    grads = synthetic(seed=5)
    sim = GradientStats.from_gradients(grads).similarity(TYPE, kind)
    # cosine/l1/l2 read the kept float32 copies; the reference reads the same values
    ref_grads = grads if kind == "kl" else {n: g.float() for n, g in grads.items()}
    np.testing.assert_allclose(sim.numpy(), np_pairwise(ref_grads, kind), rtol=1e-6, atol=1e-9)
    assert torch.allclose(sim, sim.T) and torch.equal(
        sim.diagonal(), torch.ones(5, dtype=sim.dtype)
    )


@pytest.mark.parametrize("kind", ["rmi", "cosine", "l1", "l2", "kl"])
def test_degenerate_modules(kind):
    grads = synthetic(seed=6, zero=(1, 3))
    stats = GradientStats.from_gradients(grads)
    assert stats.degenerate == [f"model.layers.{i}.self_attn.q_proj" for i in (1, 3)]
    s = stats["model.layers.1.self_attn.q_proj"]
    assert s.degenerate and s.entropy is None and s.erank is None and s.std == 0.0
    sim = stats.similarity(TYPE, kind)
    assert torch.isfinite(sim).all()
    for i in (1, 3):
        assert sim[i].tolist() == [1.0 if j == i else 0.0 for j in range(5)]
        assert sim[:, i].tolist() == [1.0 if j == i else 0.0 for j in range(5)]
    if kind == "rmi":  # the live modules' RMI ignores the degenerate ones entirely
        live = {n: g for n, g in grads.items() if g.abs().sum() > 0}
        keep = [0, 2, 4]
        np.testing.assert_allclose(sim[keep][:, keep].numpy(), np_rmi(live, "reference"), atol=1e-9)


def test_save_load_round_trip_with_gradients(tmp_path):
    grads = synthetic(seed=7)
    stats = GradientStats.from_gradients(grads, steps=3, meta={"model": "X", "world_size": 1})
    path = stats.save(tmp_path / "s.safetensors", keep_gradients=True)
    back = GradientStats.load(path)
    assert back.modules == stats.modules and back.steps == 3 and back.meta == stats.meta
    for n in grads:
        assert torch.equal(back.gradients[n], stats.gradients[n])
    for kind in ("rmi", "cosine", "l2", "kl"):
        assert torch.equal(back.similarity(TYPE, kind), stats.similarity(TYPE, kind))


def test_save_load_without_gradients(tmp_path):
    stats = GradientStats.from_gradients(synthetic(seed=8, zero=(2,)))
    path = stats.save(tmp_path / "s.safetensors")
    back = GradientStats.load(path)
    assert back.gradients is None and back.modules == stats.modules
    assert back["model.layers.2.self_attn.q_proj"].entropy is None
    assert torch.equal(back.similarity(TYPE), stats.similarity(TYPE))
    with pytest.raises(ValueError, match=r"kind 'cosine' needs the accumulated gradients"):
        back.similarity(TYPE, "cosine")


def test_save_keep_gradients_without_gradients(tmp_path):
    stats = GradientStats.from_gradients(synthetic(), keep_gradients=False)
    with pytest.raises(ValueError, match="hold no gradients"):
        stats.save(tmp_path / "s.safetensors", keep_gradients=True)


def test_other_format_version(tmp_path):
    path = GradientStats.from_gradients(synthetic()).save(tmp_path / "s.safetensors", True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta["format_version"] = "4"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"version 4; this entrolora reads versions 1, 2, 3"):
        GradientStats.load(path)


def test_truncated_file(tmp_path):
    path = GradientStats.from_gradients(synthetic()).save(tmp_path / "s.safetensors", True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        GradientStats.load(path)


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an entrolora statistics file"):
        GradientStats.load(foreign)
    with pytest.raises(ValueError, match="does not exist"):
        GradientStats.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_text(json.dumps({"not": "safetensors"}))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        GradientStats.load(junk)


def test_from_gradients_bad_inputs():
    with pytest.raises(ValueError, match="no gradients given"):
        GradientStats.from_gradients({})
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\); expected a 2-D"):
        GradientStats.from_gradients({"l.0.fc": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match=r"gradient of 'l.0.fc' contains NaN or Inf"):
        GradientStats.from_gradients({"l.0.fc": torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(ValueError, match=r"weight of 'l.0.fc' has shape \(3, 2\).*\(d_out, d_in\)"):
        GradientStats.from_gradients({"l.0.fc": torch.ones(2, 3)}, {"l.0.fc": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="weights given for modules without gradients"):
        GradientStats.from_gradients({"l.0.fc": torch.ones(2, 3)}, {"l.1.fc": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="'fc' has no layer index"):
        GradientStats.from_gradients({"fc": torch.ones(2, 3)})


def test_similarity_bad_arguments():
    grads = synthetic()
    grads["model.layers.9.self_attn.q_proj"] = torch.randn(3, 3)
    stats = GradientStats.from_gradients(grads)
    with pytest.raises(ValueError, match=r"unknown module type 'q_proj'; known types: model"):
        stats.similarity("q_proj")
    with pytest.raises(ValueError, match=r"unknown similarity kind 'dot'; choose one of rmi"):
        stats.similarity(TYPE, "dot")
    with pytest.raises(ValueError, match=r"unknown rmi_scale 'log'"):
        stats.similarity(TYPE, rmi_scale="log")
    with pytest.raises(ValueError, match=r"'cosine' needs same-shape gradients"):
        stats.similarity(TYPE, "cosine")
    assert stats.similarity(TYPE, "kl").shape == (6, 6)  # moments only: shapes may differ


def test_module_stats_is_plain_data():
    s = ModuleStats("a.0.b", "a.*.b", 0, (2, 3), 6, 0.0, 1.0, K, 2.0, None)
    assert not s.degenerate and (s.d_out, s.d_in) == (2, 3)


def test_statistics_device_argument():
    grads = synthetic(seed=9)
    a = GradientStats.from_gradients(grads)
    b = GradientStats.from_gradients(grads, device="cpu")
    assert a.modules == b.modules


# -- probe noise and the statistics of the signal (METHODS.md §2) --------------------------------
SIGNAL_FIELDS = ("noise_mean", "noise_std", "snr", "signal_std", "signal_entropy", "signal_erank")


def signal_plus_noise(
    n: int = 4, shape=(24, 40), rank: int = 6, noise: float = 0.3, steps: int = 16, seed: int = 0
):
    """Per layer: a known rank-``rank`` signal μ (σ varying by layer) and ``steps`` batch
    gradients μ + white noise; returns ``({name: μ}, {name: G₁}, {name: G₂})`` (half means)."""
    rng = np.random.default_rng(seed)
    mus, first, second = {}, {}, {}
    for i in range(n):
        u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
        v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
        mu = (u * np.linspace(1.0, 0.3, rank)) @ v.T * 1e-3 * (1 + i)
        scale = noise * np.linalg.norm(mu) / math.sqrt(mu.size) * math.sqrt(steps)
        batches = mu + scale * rng.standard_normal((steps, *shape))
        name = f"model.layers.{i}.self_attn.q_proj"
        mus[name] = mu
        first[name] = torch.from_numpy(batches[0::2].mean(0))
        second[name] = torch.from_numpy(batches[1::2].mean(0))
    return mus, first, second


def test_signal_statistics_match_numpy():
    _, first, second = signal_plus_noise(noise=1.5)  # low snr: the floor and clipping act too
    stats = GradientStats.from_halves(first, second, counts=(8, 8))
    assert stats.has_noise and stats.steps == 16
    for name in stats:
        g, d = ref.halves(first[name].numpy(), second[name].numpy(), 8, 8)
        want = ref.signal_stats(g, d)
        for f in SIGNAL_FIELDS:
            assert getattr(stats[name], f) == pytest.approx(want[f], rel=1e-9, abs=1e-15), f
        assert stats[name].erank == pytest.approx(ref.erank(g), rel=1e-6)


def test_signal_rmi_matches_numpy_and_the_unbiased_joint_variance():
    _, first, second = signal_plus_noise(noise=0.2, seed=1)
    stats = GradientStats.from_halves(first, second, counts=(8, 8))
    pairs = [ref.halves(first[n].numpy(), second[n].numpy(), 8, 8) for n in stats]
    for scale in ("reference", "raw"):
        want = ref.signal_rmi_matrix([g for g, _ in pairs], [d for _, d in pairs], scale)
        got = stats.similarity(TYPE, rmi_scale=scale, statistics="signal").numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # Where nothing is clipped, the joint variance is var([G_i, G_j]) − var([D_i, D_j]).
    (g0, d0), (g1, d1) = pairs[:2]
    joint = (
        np.concatenate([g0.ravel(), g1.ravel()]).var()
        - np.concatenate([d0.ravel(), d1.ravel()]).var()
    )
    h0, h1 = (math.log(stats[n].signal_std) + K for n in list(stats)[:2])
    rmi = (h0 + h1 - (0.5 * math.log(joint) + K)) / min(h0, h1)
    assert stats.similarity(TYPE, rmi_scale="raw", statistics="signal")[0, 1] == pytest.approx(rmi)


def test_signal_effective_rank_recovers_the_known_signal():
    # Noise at 0.6 % of the signal per element: the raw effective rank reads it in (+8 %), the
    # signal's clipped eigenvalues keep about half of that bias (docs/methods.md §2) and stay
    # within 5 %. Against a float64 numpy reference of the same formula as well.
    mus, first, second = signal_plus_noise(noise=0.006, steps=64, seed=2)
    stats = GradientStats.from_halves(first, second, counts=(32, 32))
    for name, mu in mus.items():
        true = ref.erank(mu)
        assert abs(stats[name].erank / true - 1) > 0.05  # raw: off by more than 5 %
        assert stats[name].signal_erank == pytest.approx(true, rel=0.05)
        g, d = ref.halves(first[name].numpy(), second[name].numpy(), 32, 32)
        assert stats[name].signal_erank == pytest.approx(ref.signal_erank(g, d), rel=1e-6)


def test_identical_signals_with_different_noise_have_signal_rmi_one():
    # Same μ in two layers, noise 0.3× and 1.5× its size: raw RMI sees the noise, signal not.
    shape = (48, 64)
    mus, first, second = signal_plus_noise(n=1, shape=shape, noise=0.3, steps=64, seed=3)
    _, f2, s2 = signal_plus_noise(n=1, shape=shape, noise=1.5, steps=64, seed=3)
    other = "model.layers.1.self_attn.q_proj"
    name = next(iter(mus))
    first[other], second[other] = f2[name], s2[name]
    stats = GradientStats.from_halves(first, second, counts=(32, 32))
    raw = float(stats.similarity(TYPE)[0, 1])
    signal = float(stats.similarity(TYPE, statistics="signal")[0, 1])
    assert abs(1 - signal) < abs(1 - raw) / 3
    assert stats[other].snr < 1 < stats[name].snr


def test_from_halves_weights_unequal_halves():
    _, first, second = signal_plus_noise(n=2, seed=4)
    a = GradientStats.from_halves(first, second, counts=(3, 2))
    g = {n: (3 * first[n] + 2 * second[n]) / 5 for n in first}
    d = {n: (first[n] - second[n]) * math.sqrt(6) / 5 for n in first}
    b = GradientStats.from_gradients(g, noise=d, steps=5)
    assert a.steps == 5
    for n in first:
        for f in ("mean", "std", "erank", *SIGNAL_FIELDS):
            assert getattr(a[n], f) == pytest.approx(getattr(b[n], f), rel=1e-12), f
    with pytest.raises(
        ValueError, match=r"each half needs at least one batch, got counts=\(2, 0\)"
    ):
        GradientStats.from_halves(first, second, counts=(2, 0))
    with pytest.raises(ValueError, match="first and second half must hold the same module names"):
        GradientStats.from_halves(first, {}, counts=(1, 1))


def test_noise_bad_inputs():
    g = {"l.0.fc": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"noise must hold one estimate per gradient.*'l.1.fc'"):
        GradientStats.from_gradients(g, noise={"l.1.fc": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"noise estimate of 'l.0.fc' has shape \(3, 2\)"):
        GradientStats.from_gradients(g, noise={"l.0.fc": torch.ones(3, 2)})
    with pytest.raises(ValueError, match=r"noise estimate of 'l.0.fc' contains NaN or Inf"):
        GradientStats.from_gradients(g, noise={"l.0.fc": torch.full((2, 3), float("inf"))})
    stats = GradientStats.from_gradients(g)
    with pytest.raises(ValueError, match=r"hold no noise estimate.*use statistics='raw'"):
        stats.similarity("l.*.fc", statistics="signal")
    with pytest.raises(ValueError, match=r"statistics must be one of 'signal', 'raw'; got 'mean'"):
        stats.similarity("l.*.fc", statistics="mean")


def test_noise_free_gradients_have_infinite_snr_and_raw_signal():
    grads = synthetic(n=3, seed=5)
    stats = GradientStats.from_gradients(
        grads, noise={n: torch.zeros_like(g) for n, g in grads.items()}
    )
    for s in stats.modules.values():
        assert s.snr == math.inf and s.signal_std == s.std and s.signal_entropy == s.entropy
        assert s.signal_erank == pytest.approx(s.erank, rel=1e-9)
    assert torch.allclose(stats.similarity(TYPE, statistics="signal"), stats.similarity(TYPE))


def test_low_snr_warning_names_the_steps_that_lift_it():
    _, first, second = signal_plus_noise(n=4, noise=2.0, steps=16, seed=6)
    stats = GradientStats.from_halves(first, second, counts=(8, 8))
    snrs = sorted(s.snr for s in stats.modules.values())
    assert sum(v < 1 for v in snrs) >= 3
    median = (snrs[1] + snrs[2]) / 2
    line = stats.low_snr_warning()
    assert "\n" not in line
    assert f"modules have gradient SNR < 1 at 16 probe steps (median {median:.2f})" in line
    assert f"about {math.ceil(16 / median)} probe steps would lift most above 1" in line
    assert set(stats.snr_by_type()) == {TYPE}
    _, first, second = signal_plus_noise(n=4, noise=0.1, steps=16, seed=6)
    assert GradientStats.from_halves(first, second, counts=(8, 8)).low_snr_warning() is None
    assert GradientStats.from_gradients(synthetic()).low_snr_warning() is None


def test_signal_statistics_round_trip_and_old_files_load(tmp_path):
    _, first, second = signal_plus_noise(seed=7)
    stats = GradientStats.from_halves(first, second, counts=(8, 8))
    back = GradientStats.load(stats.save(tmp_path / "s.safetensors"))
    assert back.modules == stats.modules and back.has_noise and back.noise is None
    back = GradientStats.load(stats.save(tmp_path / "g.safetensors", keep_gradients=True))
    assert set(back.noise) == set(back.gradients) == set(stats.modules)
    again = GradientStats.from_gradients(back.gradients, noise=back.noise, steps=back.steps)
    for n in stats:  # the kept G and D give the same statistics again
        for f in ("std", "erank", *SIGNAL_FIELDS):
            assert getattr(again[n], f) == pytest.approx(getattr(stats[n], f), rel=1e-6), f
    # A version-1 file (before the noise estimate): loads, and says it holds none.
    from safetensors import safe_open

    path = tmp_path / "old.safetensors"
    GradientStats.from_gradients(synthetic(seed=8)).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    mods = json.loads(meta["modules"])
    for m in mods:
        for f in SIGNAL_FIELDS:
            del m[f]
    meta.update(format_version="1", modules=json.dumps(mods))
    save_file({}, str(path), metadata=meta)
    old = GradientStats.load(path)
    assert not old.has_noise and old.snr_by_type() == {}
    assert all(m.snr is None and m.signal_erank is None for m in old.modules.values())


# -- singular values (the auto planner's prices, METHODS.md §7) ---------------------------------
def numpy_signal_sv(g: np.ndarray, d: np.ndarray | None) -> np.ndarray:
    """Independent reference: descending square roots of the clipped eigenvalues of the
    smaller-side ``GGᵀ − DDᵀ`` (``GGᵀ`` without D), float64."""
    wide = g.shape[0] <= g.shape[1]
    gram = g @ g.T if wide else g.T @ g
    if d is not None:
        gram = gram - (d @ d.T if wide else d.T @ d)
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]


def test_spectra_match_numpy_raw_and_signal():
    _, first, second = signal_plus_noise(seed=3, shape=(40, 24))
    stats = GradientStats.from_halves(first, second, counts=(8, 8))
    for n, s in stats.modules.items():
        g, d = stats.gradients[n].double().numpy(), stats.noise[n].double().numpy()
        assert len(s.spectrum) == len(s.signal_spectrum) == 24
        scale = s.spectrum[0]
        np.testing.assert_allclose(s.spectrum, np.linalg.svd(g, compute_uv=False), rtol=1e-6)
        np.testing.assert_allclose(s.signal_spectrum, numpy_signal_sv(g, d), atol=1e-6 * scale)
        assert list(s.signal_spectrum) == sorted(s.signal_spectrum, reverse=True)
    # without a noise estimate: the raw singular values, and no signal spectrum
    raw = GradientStats.from_gradients(synthetic(seed=4), keep_gradients=False)
    for n, g in synthetic(seed=4).items():
        want = np.linalg.svd(g.numpy(), compute_uv=False)
        np.testing.assert_allclose(raw[n].spectrum, want, rtol=1e-6)
        assert raw[n].signal_spectrum is None and raw[n].spectrum_of("raw") == raw[n].spectrum


def test_spectra_keep_the_top_values_and_skip_degenerate_modules(monkeypatch):
    import entrolora.stats.gradient_stats as st  # where from_gradients reads it

    monkeypatch.setattr(st, "SPECTRUM_KEEP", 3)
    stats = GradientStats.from_gradients(synthetic(zero=(1,)))
    live = stats["model.layers.0.self_attn.q_proj"]
    g = synthetic()["model.layers.0.self_attn.q_proj"].numpy()
    np.testing.assert_allclose(live.spectrum, np.linalg.svd(g, compute_uv=False)[:3], rtol=1e-6)
    assert stats["model.layers.1.self_attn.q_proj"].spectrum is None


def test_spectra_round_trip_and_version_2_files_load_without_them(tmp_path):
    _, first, second = signal_plus_noise(seed=5)
    stats = GradientStats.from_halves(first, second, counts=(8, 8))
    back = GradientStats.load(stats.save(tmp_path / "s.safetensors"))
    assert back.modules == stats.modules
    from safetensors import safe_open

    path = tmp_path / "v2.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    mods = json.loads(meta["modules"])
    for m in mods:
        del m["spectrum"], m["signal_spectrum"]
    meta.update(format_version="2", modules=json.dumps(mods))
    save_file({}, str(path), metadata=meta)
    old = GradientStats.load(path)
    assert old.has_noise
    assert all(m.spectrum is None and m.signal_spectrum is None for m in old.modules.values())
