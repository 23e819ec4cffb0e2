"""entrolora.probe against an independent float64 reference on tiny random HF models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import entrolora as el
import reference_methods as ref
from entrolora.targets import find_targets
from tiny import cls_batches, lm_batches, tiny_bert, tiny_gpt2, tiny_llama

HALF_LOG_2PI_PLUS_HALF = 0.5 * math.log(2 * math.pi) + 0.5

CASES = {
    "llama": (tiny_llama, lm_batches, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, lm_batches, ["c_attn", "mlp.c_proj"]),
    "bert": (tiny_bert, cls_batches, ["query", "value"]),
}


def reference_gradients(model: nn.Module, batches, names, loss_fn=None) -> dict[str, np.ndarray]:
    """Mean over batches of ∂loss/∂W per module, float64 numpy, in (d_out, d_in) orientation:
    one torch.autograd.grad call per batch, independent of the probe's hooks."""
    targets = find_targets(model, names)
    weights = [model.get_submodule(n).weight for n in targets]
    total = [np.zeros(tuple(w.shape), dtype=np.float64) for w in weights]
    for b in batches:
        loss = loss_fn(model, b) if loss_fn else model(**b).loss
        grads = torch.autograd.grad(loss, weights)
        for t, g in zip(total, grads):
            t += g.detach().to(torch.float64).numpy()
    out = {}
    for (name, tgt), t in zip(targets.items(), total):
        g = t / len(batches)
        out[name] = g.T if tgt.transposed else g
    return out


def numpy_stats(g: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """METHODS.md §2 in plain float64 numpy."""
    std = g.std()  # ddof = 0
    sv = np.linalg.svd(g, compute_uv=False)
    p = sv / sv.sum()
    p = p[p > 0]
    return {
        "mean": g.mean(),
        "std": std,
        "entropy": math.log(std) + HALF_LOG_2PI_PLUS_HALF,
        "erank": math.exp(-(p * np.log(p)).sum()),
        "sensitivity": np.abs(w * g).mean(),
    }


def weight_np(model: nn.Module, name: str, transposed: bool) -> np.ndarray:
    w = model.get_submodule(name).weight.detach().to(torch.float64).numpy()
    return w.T if transposed else w


@pytest.mark.parametrize("arch", sorted(CASES))
def test_statistics_match_float64_reference(arch):
    make, make_batches, names = CASES[arch]
    model = make(layers=3)
    batches = make_batches(3)
    # head="model": the reference reads through the loaded head (a classifier's default is the
    # centroid head, tests/test_probe_head.py)
    stats = el.probe(model, batches, names, steps=3, progress=False, head="model")
    ref = reference_gradients(model, batches, names)
    targets = find_targets(model, names)
    assert list(stats) == list(targets)
    assert stats.steps == 3
    for name, g_ref in ref.items():
        s = stats[name]
        assert s.shape == g_ref.shape  # Conv1D reported as (d_out, d_in)
        g = stats.gradients[name].to(torch.float64).numpy()
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6 * np.abs(g_ref).max())
        want = numpy_stats(g_ref, weight_np(model, name, targets[name].transposed))
        assert s.mean == pytest.approx(want["mean"], abs=1e-5 * want["std"])
        assert s.std == pytest.approx(want["std"], rel=1e-5)
        assert s.entropy == pytest.approx(want["entropy"], abs=1e-5)
        assert s.erank == pytest.approx(want["erank"], rel=1e-4)
        assert s.sensitivity == pytest.approx(want["sensitivity"], rel=1e-5)


@pytest.mark.parametrize("steps", [4, 5])  # 5: the halves hold 3 and 2 batches
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_noise_estimate_from_even_and_odd_halves(arch, steps):
    make, make_batches, names = CASES[arch]
    model = make(layers=2)
    batches = make_batches(steps, seed=3)
    stats = el.probe(model, batches, names, steps=steps, progress=False)
    even = reference_gradients(model, batches[0::2], names)
    odd = reference_gradients(model, batches[1::2], names)
    n1, n2 = len(batches[0::2]), len(batches[1::2])
    assert stats.meta["halves"] == [n1, n2] and stats.has_noise
    for name in stats:
        g, d = ref.halves(even[name], odd[name], n1, n2)
        scale = np.abs(g).max()
        np.testing.assert_allclose(stats.gradients[name].numpy(), g, rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(stats.noise[name].numpy(), d, rtol=1e-4, atol=1e-6 * scale)
        want = ref.signal_stats(g, d)
        s = stats[name]
        assert s.noise_std == pytest.approx(want["noise_std"], rel=1e-4)
        assert s.noise_mean == pytest.approx(want["noise_mean"], abs=1e-5 * want["noise_std"])
        assert s.snr == pytest.approx(want["snr"], rel=1e-3, abs=1e-6)
        assert s.signal_std == pytest.approx(want["signal_std"], rel=1e-3)


def test_one_batch_has_no_noise_estimate_and_planners_read_raw():
    stats = el.probe(tiny_llama(layers=2), lm_batches(1), ["q_proj"], steps=1, progress=False)
    assert not stats.has_noise and stats.noise is None
    assert all(m.snr is None for m in stats.modules.values())
    with pytest.warns(UserWarning, match="hold no noise estimate") as seen:
        plan = el.plan_e2lora(stats)
        el.plan_ralora(stats)  # the same statistics warn once
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    assert plan.options["statistics"] == "raw"


def test_single_batch_is_captured():
    # A probe that folds gradients only when the next batch arrives would return zeros here.
    model = tiny_llama(layers=2)
    batches = lm_batches(1)
    stats = el.probe(model, batches, ["v_proj"], steps=1, progress=False)
    ref = reference_gradients(model, batches, ["v_proj"])
    assert not stats.degenerate
    for name, g_ref in ref.items():
        np.testing.assert_allclose(stats.gradients[name].numpy(), g_ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_hooks_fire_once_per_batch(reentrant):
    model = tiny_llama(layers=3)
    batches = lm_batches(3)
    ref = reference_gradients(model.train(), batches, ["q_proj", "o_proj"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # transformers checkpoints only in train mode; tiny Llama has no dropout
    stats = el.probe(model, batches, ["q_proj", "o_proj"], steps=3, progress=False)
    for name, g_ref in ref.items():
        np.testing.assert_allclose(
            stats.gradients[name].numpy(), g_ref, rtol=1e-4, atol=1e-6 * np.abs(g_ref).max()
        )


def test_only_targets_require_grad_and_gradients_are_freed():
    model = tiny_llama(layers=2)
    target_weights = {f"{n}.weight" for n in find_targets(model, ["k_proj"])}
    seen = []

    def loss_fn(m, batch):
        requiring = {n for n, p in m.named_parameters() if p.requires_grad}
        alive = [n for n, p in m.named_parameters() if p.grad is not None]
        seen.append((requiring, alive, m.training))
        return m(**batch).loss

    el.probe(model, lm_batches(3), ["k_proj"], steps=3, loss_fn=loss_fn, progress=False)
    assert len(seen) == 3
    for requiring, alive, training in seen:
        assert requiring == target_weights
        assert alive == []  # every gradient was folded and dropped during the previous backward
        assert training is False  # the model's own (eval) mode is kept
    assert all(p.requires_grad for p in model.parameters())


def test_train_mode_is_kept_during_the_probe():
    model = tiny_llama(layers=2).train()
    modes = []

    def loss_fn(m, batch):
        modes.append(m.training)
        return m(**batch).loss

    el.probe(model, lm_batches(2), ["q_proj"], steps=2, loss_fn=loss_fn, progress=False)
    assert modes == [True, True]
    assert model.training


class Boom(RuntimeError):
    pass


def test_state_restored_after_exception_mid_probe():
    model = tiny_llama(layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[1].train()  # mixed modes must come back exactly
    q0 = model.model.layers[0].self_attn.q_proj.weight
    norm = model.model.norm.weight
    q_grad = torch.full_like(q0, 3.0)
    norm_grad = torch.full_like(norm, -1.0)
    q0.grad, norm.grad = q_grad, norm_grad
    before_req = {n: p.requires_grad for n, p in model.named_parameters()}
    before_mode = {n: m.training for n, m in model.named_modules()}
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise Boom("batch 1 exploded")
        return m(**batch).loss

    with pytest.raises(Boom, match="batch 1 exploded"):
        el.probe(model, lm_batches(3), ["q_proj"], steps=3, loss_fn=loss_fn, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_req
    assert {n: m.training for n, m in model.named_modules()} == before_mode
    assert q0.grad is q_grad and torch.equal(q_grad, torch.full_like(q0, 3.0))
    assert norm.grad is norm_grad
    others = [p.grad for n, p in model.named_parameters() if p is not q0 and p is not norm]
    assert all(g is None for g in others)
    # The hooks are gone: a plain backward now leaves ordinary gradients.
    model.zero_grad(set_to_none=True)
    model(**lm_batches(1)[0]).loss.backward()
    assert q0.grad is not None


def test_state_restored_after_non_finite_loss():
    model = tiny_llama(layers=2)
    before_req = {n: p.requires_grad for n, p in model.named_parameters()}

    def loss_fn(m, batch):
        return m(**batch).loss * float("nan")

    with pytest.raises(ValueError, match="loss of batch 0 is nan"):
        el.probe(model, lm_batches(2), ["q_proj"], steps=2, loss_fn=loss_fn, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_req
    assert all(p.grad is None for p in model.parameters())


def test_nan_loss_names_the_batch_index():
    model = tiny_llama(layers=2)
    calls: list[int] = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        return loss * float("inf") if len(calls) == 3 else loss

    with pytest.raises(ValueError, match=r"loss of batch 2 is inf"):
        el.probe(model, lm_batches(4), ["q_proj"], steps=4, loss_fn=loss_fn, progress=False)


class _InfGradient(torch.autograd.Function):
    """Adds 0 to the loss but sends an infinite gradient to its input only."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


def test_non_finite_gradient_names_the_module_and_batch():
    model = tiny_llama(layers=2)
    bad = "model.layers.1.self_attn.v_proj"
    weight = model.get_submodule(bad).weight
    calls: list[int] = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        return loss + _InfGradient.apply(weight) if len(calls) == 2 else loss

    with pytest.raises(ValueError, match=rf"gradient of module '{bad}' in batch 1 contains NaN"):
        el.probe(model, lm_batches(3), ["v_proj"], steps=3, loss_fn=loss_fn, progress=False)


def test_short_iterator_is_an_error():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match=r"batches ran out after 2 of steps=5 .*allow_fewer=True"):
        el.probe(model, iter(lm_batches(2)), ["q_proj"], steps=5, progress=False)


def test_allow_fewer_uses_the_batches_seen():
    model = tiny_llama(layers=2)
    batches = lm_batches(2)
    stats = el.probe(model, iter(batches), ["q_proj"], steps=5, allow_fewer=True, progress=False)
    assert stats.steps == 2 and stats.meta["steps"] == 2
    ref = reference_gradients(model, batches, ["q_proj"])
    for name, g_ref in ref.items():
        np.testing.assert_allclose(stats.gradients[name].numpy(), g_ref, rtol=1e-4, atol=1e-9)


def test_zero_batches_is_always_an_error():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="batches is empty"):
        el.probe(model, [], ["q_proj"], steps=3, allow_fewer=True, progress=False)


def test_stops_after_steps_batches():
    model = tiny_llama(layers=2)
    batches = lm_batches(5)
    consumed = []

    def gen():
        for b in batches:
            consumed.append(1)
            yield b

    stats = el.probe(model, gen(), ["q_proj"], steps=2, progress=False)
    assert stats.steps == 2 and len(consumed) == 2
    ref = reference_gradients(model, batches[:2], ["q_proj"])
    for name, g_ref in ref.items():
        np.testing.assert_allclose(stats.gradients[name].numpy(), g_ref, rtol=1e-4, atol=1e-9)


def test_degenerate_module_is_reported_not_an_error():
    model = tiny_llama(layers=3)
    with torch.no_grad():  # v_proj of layer 0 feeds only o_proj of layer 0: zero gradient
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    stats = el.probe(model, lm_batches(2), ["v_proj"], steps=2, progress=False)
    name = "model.layers.0.self_attn.v_proj"
    assert stats.degenerate == [name]
    assert stats[name].entropy is None and stats[name].erank is None
    sim = stats.similarity("model.layers.*.self_attn.v_proj")
    assert torch.isfinite(sim).all()
    assert sim[0, 1:].eq(0).all() and sim[1:, 0].eq(0).all() and sim[0, 0] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_accumulate_in_float32(dtype):
    model = tiny_llama(layers=2).to(dtype)
    batches = lm_batches(2)
    stats = el.probe(model, batches, ["q_proj", "v_proj"], steps=2, progress=False)
    ref = reference_gradients(model, batches, ["q_proj", "v_proj"])
    assert stats.meta["dtype"] == str(dtype).removeprefix("torch.")
    for name, g_ref in ref.items():
        g = stats.gradients[name]
        assert g.dtype == torch.float32
        # The reference sums the same low-precision gradients in float64.
        np.testing.assert_allclose(g.numpy(), g_ref, rtol=1e-5, atol=1e-6 * np.abs(g_ref).max())
        assert isinstance(stats[name].std, float) and stats[name].std > 0


def test_loss_fn_and_non_dict_batches():
    model = tiny_llama(layers=2)
    pairs = [(b["input_ids"], b["labels"]) for b in lm_batches(2)]

    def loss_fn(m, batch):
        ids, labels = batch
        return m(input_ids=ids, labels=labels).loss

    stats = el.probe(model, pairs, ["q_proj"], steps=2, loss_fn=loss_fn, progress=False)
    ref = reference_gradients(model, lm_batches(2), ["q_proj"])
    for name, g_ref in ref.items():
        np.testing.assert_allclose(stats.gradients[name].numpy(), g_ref, rtol=1e-4, atol=1e-9)


def test_non_dict_batch_without_loss_fn_is_a_type_error():
    model = tiny_llama(layers=2)
    with pytest.raises(TypeError, match=r"batch 0 is a tuple, not a dict.*loss_fn"):
        el.probe(model, [(1, 2)], ["q_proj"], steps=1, progress=False)


def test_batch_without_labels_has_no_loss():
    model = tiny_llama(layers=2)
    batches = [{"input_ids": b["input_ids"]} for b in lm_batches(1)]
    with pytest.raises(ValueError, match=r"batch 0 has no \.loss; include labels"):
        el.probe(model, batches, ["q_proj"], steps=1, progress=False)


def test_loss_that_does_not_reach_the_targets():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="does not depend on any target weight"):
        el.probe(model, lm_batches(1), ["q_proj"], steps=1, loss_fn=lambda m, b: torch.tensor(1.0))


def test_non_scalar_loss():
    model = tiny_llama(layers=2)

    def loss_fn(m, b):
        return m(**b).logits

    with pytest.raises(ValueError, match="must be a scalar tensor"):
        el.probe(model, lm_batches(1), ["q_proj"], steps=1, loss_fn=loss_fn, progress=False)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        el.probe(tiny_llama(layers=1), lm_batches(1), ["q_proj"], steps=steps, progress=False)


def test_bad_offload():
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        el.probe(tiny_llama(layers=1), lm_batches(1), ["q_proj"], steps=1, offload="gpu")


def test_target_errors_pass_through():
    with pytest.raises(ValueError, match="'qproj' matched no module"):
        el.probe(tiny_llama(layers=1), lm_batches(1), ["qproj"], steps=1, progress=False)


def test_offload_cpu_on_a_cpu_model_gives_the_same_statistics():
    model = tiny_llama(layers=2)
    batches = lm_batches(2)
    a = el.probe(model, batches, ["q_proj"], steps=2, progress=False)
    b = el.probe(model, batches, ["q_proj"], steps=2, offload="cpu", progress=False)
    for name in a:
        assert torch.equal(a.gradients[name], b.gradients[name])
        assert torch.equal(a.noise[name], b.noise[name])
        assert a[name] == b[name]


def test_keep_gradients_false_and_meta():
    model = tiny_gpt2(layers=2)
    stats = el.probe(
        model, lm_batches(1), ["c_attn"], steps=1, keep_gradients=False, progress=False
    )
    assert stats.gradients is None
    assert stats.meta == {
        "model": "GPT2LMHeadModel",
        "target_modules": ["c_attn"],
        "steps": 1,
        "halves": [1, 0],
        "world_size": 1,
        "dtype": "float32",
        "model_params": sum(p.numel() for p in model.parameters()),
    }
    with pytest.raises(ValueError, match="needs the accumulated gradients"):
        stats.similarity("transformer.h.*.attn.c_attn", kind="cosine")


def test_progress_bar_shows_steps(capsys):
    pytest.importorskip("tqdm")
    el.probe(tiny_llama(layers=1), lm_batches(2), ["q_proj"], steps=2, progress=True)
    err = capsys.readouterr().err
    assert "probe" in err and "step/s" in err


class _Stack(nn.Module):
    """A non-HF model whose two layers' Linear modules share one weight (tied targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleDict({"proj": nn.Linear(4, 4, bias=False)}) for _ in range(2)]
        )
        self.layers[1]["proj"].weight = self.layers[0]["proj"].weight
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["proj"](x))
        return self.head(x).sum()


def test_tied_targets_and_plain_models():
    torch.manual_seed(0)
    model = _Stack()
    xs = [torch.randn(3, 4) for _ in range(2)]
    stats = el.probe(model, xs, ["proj"], steps=2, loss_fn=lambda m, x: m(x), progress=False)
    w = model.layers[0]["proj"].weight
    ref = sum(torch.autograd.grad(model(x), [w])[0].double() for x in xs) / 2
    for name in ("layers.0.proj", "layers.1.proj"):
        np.testing.assert_allclose(stats.gradients[name].double(), ref, rtol=1e-5, atol=1e-8)


def test_sharded_weights_are_refused_with_the_workaround():
    model = tiny_llama(layers=1)
    model.model.layers[0].self_attn.q_proj.weight.ds_id = 7  # what ZeRO-3 attaches
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is sharded.*before"):
        el.probe(model, lm_batches(1), ["q_proj"], steps=1, progress=False)


class FullyShardedDataParallel(nn.Module):
    """Stands in for torch's FSDP wrapper (recognised by class name)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def test_fsdp_wrapped_models_are_refused():
    model = FullyShardedDataParallel(tiny_llama(layers=1))
    with pytest.raises(ValueError, match=r"wrapped in FullyShardedDataParallel.*before wrapping"):
        el.probe(model, lm_batches(1), ["q_proj"], steps=1, progress=False)


def test_probe_under_no_grad_still_works():
    model = tiny_llama(layers=1)
    with torch.no_grad():
        stats = el.probe(model, lm_batches(1), ["q_proj"], steps=1, progress=False)
    assert not stats.degenerate


def test_integer_weights_are_refused():
    model = tiny_llama(layers=1)
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"q_proj' is torch.int8 \(a quantized layer\?\)"):
        el.probe(model, lm_batches(1), ["q_proj"], steps=1, progress=False)


@pytest.mark.gpu
def test_pinned_host_half_sums_match_device_half_sums_on_cuda():
    # offload="cpu" folds each step into the half of its batch in pinned host memory
    model = tiny_llama(layers=2).cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in lm_batches(5, seed=4)]
    a = el.probe(model, batches, ["q_proj", "v_proj"], steps=5, progress=False)
    b = el.probe(model, batches, ["q_proj", "v_proj"], steps=5, offload="cpu", progress=False)
    assert b.meta["halves"] == [3, 2]
    for name in a:
        torch.testing.assert_close(a.gradients[name], b.gradients[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(a.noise[name], b.noise[name], rtol=1e-6, atol=0)
        assert b[name].snr == pytest.approx(a[name].snr, rel=1e-5)
