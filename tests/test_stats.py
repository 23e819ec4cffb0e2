"""GradientStats on synthetic gradients against independent float64 numpy (METHODS.md §2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

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
    meta["format_version"] = "2"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"format version 2; this entrolora reads version 1"):
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
