"""entrolora.train: the job's pieces checked against independent computations, determinism,
the classifier head in the peft export, and nothing half-written on failure."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from entrolora import train as T
from test_data import save_tiny_model, write_csv


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-assets")
    return {"bert": str(save_tiny_model(root, "bert")), "csv": str(write_csv(root / "d.csv", 40))}


def cfg(assets, out, **kw) -> T.TrainConfig:
    base = dict(model=assets["bert"], data=assets["csv"], epochs=1, batch_size=8, probe_steps=2,
                r=2, output=str(out), progress=False, report=False)  # fmt: skip
    return T.TrainConfig(**{**base, **kw})


# -- pure helpers ----------
def test_lr_schedule_warmup_then_linear_decay():
    f = T._lr_lambda(total=10, warmup=2)
    got = [f(s) for s in range(10)]
    want = [0.5, 1.0] + [(10 - s) / 8 for s in range(2, 10)]
    assert got == pytest.approx(want)
    assert T._lr_lambda(4, 0)(0) == 1.0


def test_adamw_is_fused_where_torch_can_and_steps_as_the_default():
    from entrolora.job.loop import adamw

    def steps(fused: bool | None) -> list[np.ndarray]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
        opt = adamw(ps, 1e-2, 0.1) if fused else torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
        assert opt.defaults["fused"] is fused
        for t in range(5):
            for p in ps:
                p.grad = (t + 1) * torch.linspace(-1, 1, p.numel()).view_as(p)
            opt.step()
        return [p.detach().numpy().astype(np.float64) for p in ps]

    for a, b in zip(steps(True), steps(None)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert adamw(mixed, 1e-3).defaults["fused"] is None  # several devices: torch's default


def test_parse_options():
    assert T.parse_options(["n_max=16", "threshold=0.85", "partition=dp", "x=none", "y=true"]) == {
        "n_max": 16, "threshold": 0.85, "partition": "dp", "x": None, "y": True,
    }  # fmt: skip
    with pytest.raises(ValueError, match="is not key=value"):
        T.parse_options(["n_max"])


def test_normalize_method():
    assert T.normalize_method("RaLoRA_Pro") == "ralora-pro"
    assert T.planner_name("ralora-pro") == "ralora_pro"
    assert T.normalize_method("loraplus") == "lora-plus"
    with pytest.raises(ValueError, match="unknown method 'x'; choose one of"):
        T.normalize_method("x")


def test_default_targets_bert_attention_only(assets):
    from transformers import AutoModelForSequenceClassification

    from entrolora.targets import find_targets

    model = AutoModelForSequenceClassification.from_pretrained(assets["bert"])
    names = list(find_targets(model, T.default_targets(model)))
    assert len(names) == 3 * 4  # 3 layers × query, key, value, attention.output.dense
    assert all(".attention." in n for n in names)  # "output.dense" of the MLP is not matched


def test_default_targets_unknown_family():
    model = SimpleNamespace(config=SimpleNamespace(model_type="mamba"))
    with pytest.raises(ValueError, match="pass --target-modules"):
        T.default_targets(model)


def test_resolve_device_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="use --device cpu"):
        T.resolve_device("cuda")


# -- evaluation against numpy ----------
class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits[input_ids[:, 0]])


def _np_ce(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def test_evaluate_classify_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 3, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    batches = [
        {"input_ids": torch.arange(0, 6)[:, None], "labels": labels[:6]},
        {"input_ids": torch.arange(6, 10)[:, None], "labels": labels[6:]},
    ]
    out = T.evaluate(FixedLogits(logits), batches, "classify", torch.device("cpu"))
    ln, yn = logits.double().numpy(), labels.numpy()
    assert out["eval_loss"] == pytest.approx(_np_ce(ln, yn).mean(), rel=1e-6)
    assert out["accuracy"] == pytest.approx((ln.argmax(-1) == yn).mean())


def test_evaluate_advances_the_bar_by_examples():
    """The evaluation bar moves by each batch's examples and ends at the total."""
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(10, dtype=torch.long)
    batches = [
        {"input_ids": torch.arange(0, 6)[:, None], "labels": labels[:6]},
        {"input_ids": torch.arange(6, 10)[:, None], "labels": labels[6:]},
    ]

    class Bar:
        steps: list[int] = []

        def update(self, n=1):
            self.steps.append(n)

    bar = Bar()
    T.evaluate(FixedLogits(logits), batches, "classify", torch.device("cpu"), bar)
    assert bar.steps == [6, 4]


def test_evaluate_causal_matches_numpy():
    g = torch.Generator().manual_seed(1)
    vocab, seq = 7, 5
    table = torch.randn(4, seq, vocab, generator=g)

    class LM(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=table[input_ids[:, 0]])

    ids = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 0, 0]])
    labels = ids.clone()
    labels[1, 3:] = -100
    out = T.evaluate(LM(), [{"input_ids": ids, "labels": labels}], "causal-lm", torch.device("cpu"))
    losses = []
    for b in range(2):
        lg = table[ids[b, 0]].double().numpy()[:-1]
        tg = labels[b, 1:].numpy()
        keep = tg != -100
        losses.extend(_np_ce(lg[keep], tg[keep]))
    assert out["eval_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert out["perplexity"] == pytest.approx(np.exp(np.mean(losses)), rel=1e-6)


# -- runs ----------
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("method", ["dora", "e2lora"])
def test_runs_are_deterministic(assets, tmp_path, method):
    a = T.train_run(cfg(assets, tmp_path / "a", method=method))
    b = T.train_run(cfg(assets, tmp_path / "b", method=method))
    for key in ("eval_loss", "accuracy", "final_train_loss", "trainable_params"):
        assert a.metrics[key] == b.metrics[key], key
    wa, wb = _weights(a.output / "peft"), _weights(b.output / "peft")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_failure_leaves_nothing(assets, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise ValueError("evaluation exploded")

    monkeypatch.setattr("entrolora.job.run.evaluate", boom)
    with pytest.raises(ValueError, match="evaluation exploded"):
        T.train_run(cfg(assets, tmp_path / "out", method="vera"))
    assert list(tmp_path.iterdir()) == []


def test_peft_export_carries_trained_head(assets, tmp_path):
    """The exported peft checkpoint (LoRA + modules_to_save head) reproduces the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import entrolora as el

    run = T.train_run(cfg(assets, tmp_path / "run", method="lora", epochs=2, lr=1e-2)).output
    ids = torch.randint(5, 80, (3, 6), generator=torch.Generator().manual_seed(0))

    ours = AutoModelForSequenceClassification.from_pretrained(assets["bert"])
    from safetensors.torch import load_file

    head = load_file(str(run / "adapter" / "head.safetensors"))
    ours.load_state_dict(head, strict=False)
    ours = el.load(ours, run / "adapter").eval()

    base = AutoModelForSequenceClassification.from_pretrained(assets["bert"])
    peft_model = PeftModel.from_pretrained(base, str(run / "peft")).eval()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    fresh = AutoModelForSequenceClassification.from_pretrained(assets["bert"]).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-4)  # it trained


def test_metrics_record_times_and_memory(assets, tmp_path):
    m = T.train_run(cfg(assets, tmp_path / "r", method="e2lora")).metrics
    assert m["probe_s"] > 0 and m["train_s"] > 0 and m["eval_s"] > 0
    assert m["peak_memory_kind"] == "cpu_ru_maxrss" and m["peak_memory_mib"] > 0
    assert m["plan_params"] == m["trainable_params"]  # adapter params as the plan counts them
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["steps"] == m["steps"] == 4  # 32 training rows / batch 8


def test_flexlora_counts_active_directions_not_capacity(assets, tmp_path):
    m = T.train_run(cfg(assets, tmp_path / "r", method="flexlora")).metrics
    # the budget FlexLoRA keeps constant: r·(d_in + d_out + 1) per module, capacity 2r allocated
    assert m["trainable_params"] == m["plan_params"]
    assert m["allocated_params"] > m["trainable_params"]


@pytest.mark.parametrize("keep", [False, True])
def test_saved_statistics_keep_gradients_only_when_asked(assets, tmp_path, keep):
    import entrolora as el

    run = T.train_run(cfg(assets, tmp_path / "r", method="e2lora", keep_gradients=keep))
    saved = el.GradientStats.load(run.output / "stats.safetensors")
    query = "bert.encoder.layer.*.attention.self.query"
    if keep:
        want = run.stats.similarity(query, "cosine")
        assert torch.allclose(saved.similarity(query, "cosine"), want)
    else:
        with pytest.raises(ValueError, match="needs the accumulated gradients"):
            saved.similarity(query, "cosine")


@pytest.mark.parametrize("method", ["lora", "peft-lora"])
def test_init_seed_redraws_the_adapter_factors(assets, tmp_path, method):
    def adapter(init_seed, name):
        out = tmp_path / name
        return _weights(T.train_run(cfg(assets, out, method=method, init_seed=init_seed)).output)

    a, again, other = adapter(7, "a"), adapter(7, "again"), adapter(8, "other")
    assert a.keys() == other.keys() and a
    assert all(torch.equal(a[k], again[k]) for k in a)  # deterministic
    assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k or ".A" in k)
    if method == "lora":  # entrolora's default draw is --seed's
        default, same = adapter(None, "default"), adapter(0, "same")
        assert all(torch.equal(default[k], same[k]) for k in default)


def test_e2lori_masks_from_the_probe_through_the_job(assets, tmp_path):
    """E²LoRI's mask is calibrated from the probe's gradients; a reused plan probes for them,
    statistics saved without gradients are refused (unless -o mask=random)."""
    a = T.train_run(cfg(assets, tmp_path / "a", method="e2lori"))
    assert json.loads((a.output / "plan.json").read_text())["options"]["mask"] == "magnitude"
    b = T.train_run(cfg(assets, tmp_path / "b", method="e2lori", plan=str(a.output / "plan.json")))
    assert (
        b.metrics["probe_s"] > 0 and b.metrics["trainable_params"] == a.metrics["trainable_params"]
    )
    stats = str(a.output / "stats.safetensors")  # saved without gradients
    with pytest.raises(ValueError, match="magnitude mask needs the probed gradients, which"):
        T.train_run(cfg(assets, tmp_path / "c", method="e2lori", stats=stats))
    assert not (tmp_path / "c").exists()
    d = T.train_run(
        cfg(assets, tmp_path / "d", method="e2lori", stats=stats, options={"mask": "random"})
    )
    assert json.loads((d.output / "plan.json").read_text())["options"]["mask"] == "random"


def test_auto_through_the_job(assets, tmp_path):
    """auto probes every linear layer of the stack, spends LoRA r=--r's parameters on the
    default targets, and init=gradient reads the probe's gradients (a reused plan probes for
    them; statistics saved without gradients are refused)."""
    from entrolora.plans import AdaptationPlan

    a = T.train_run(cfg(assets, tmp_path / "a", method="auto", options={"init": "gradient"}))
    plan = AdaptationPlan.load(a.output / "plan.json")
    stats = a.stats
    assert len(stats) == 18  # 3 layers × (q, k, v, attention output, intermediate, output)
    like = stats.meta["like_lora"]  # LoRA on q, k, v, attention output: 3 × 4 × (32 + 32)
    assert like["targets"][0] == "attention.self.query" and like["params_per_rank"] == 768
    assert plan.options["budget"] == 2 * 768 >= plan.num_trainable_params() > 0
    assert plan.options["init"] == "gradient" and a.metrics["trainable_params"] > 0
    b = T.train_run(cfg(assets, tmp_path / "b", method="auto", plan=str(a.output / "plan.json")))
    assert b.metrics["probe_s"] > 0 and b.metrics["accuracy"] == a.metrics["accuracy"]
    saved = str(a.output / "stats.safetensors")
    with pytest.raises(ValueError, match="init=gradient needs the probed gradients, which"):
        T.train_run(cfg(assets, tmp_path / "c", method="auto", stats=saved,
                        options={"init": "gradient"}))  # fmt: skip
    c = T.train_run(cfg(assets, tmp_path / "c", method="auto", stats=saved,
                        options={"budget": 3000}))  # fmt: skip
    assert c.plan.options["budget"] == 3000
