"""The probe's classifier head (``--probe-head``, issue 14 item 5): the centroid head checked
against class means computed independently in float64 numpy, the loaded head restored, the
cases where it does not apply, and statistics that no longer depend on the head's seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entrolora.job import centroid_head, output_layer
from tiny import VOCAB, cls_batches, tiny_bert, tiny_llama


def _expected_rows(features: list[np.ndarray], labels: list[np.ndarray], classes: int, norm):
    x, y = np.concatenate(features).astype(np.float64), np.concatenate(labels)
    rows = np.zeros((classes, x.shape[1]))
    for c in range(classes):
        if (y == c).any():
            rows[c] = x[y == c].mean(0) - x.mean(0)
    return rows * (norm / np.linalg.norm(rows))


def _check_inside_and_after(model, batches, layer, want):
    before = [p.detach().clone() for p in layer.parameters()]
    with centroid_head(model, batches) as used:
        assert used
        np.testing.assert_allclose(
            layer.weight.detach().double().numpy(), want, rtol=1e-5, atol=1e-7
        )
        if layer.bias is not None:
            assert not layer.bias.any()
    for p, old in zip(layer.parameters(), before):
        assert torch.equal(p, old)  # the loaded head is back


def test_bert_centroid_rows_are_centred_class_means_of_the_pooled_output():
    model = tiny_bert(layers=2, num_labels=3)
    batches = cls_batches(5, batch=6, num_labels=3)
    with torch.no_grad():
        feats = [model.bert(input_ids=b["input_ids"]).pooler_output.numpy() for b in batches]
    labels = [b["labels"].numpy() for b in batches]
    norm = model.config.initializer_range * np.sqrt(3 * model.config.hidden_size)
    _check_inside_and_after(
        model, batches, model.classifier, _expected_rows(feats, labels, 3, norm)
    )


def test_llama_centroid_rows_read_the_last_non_pad_token():
    model = tiny_llama(layers=2, num_labels=2)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(1, VOCAB, (5, 7), generator=g)
        ends = torch.randint(2, 8, (5,), generator=g)
        ids[torch.arange(7) >= ends[:, None]] = 0  # right padding with pad_token_id 0
        labels = torch.tensor([0, 1, 0, 1, 1])
        batches.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels})
    feats = []
    with torch.no_grad():
        for b in batches:
            hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            last = b["attention_mask"].sum(1) - 1
            feats.append(hidden.last_hidden_state[torch.arange(5), last].numpy())
    labels = [b["labels"].numpy() for b in batches]
    norm = model.config.initializer_range * np.sqrt(2 * model.config.hidden_size)
    _check_inside_and_after(model, batches, model.score, _expected_rows(feats, labels, 2, norm))


def test_roberta_centroid_rows_read_the_heads_dense_output():
    """RoBERTa's head is dense + tanh + out_proj: the output layer is out_proj, fed by the
    dense layer's output on the first token."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,
    )
    model = RobertaForSequenceClassification(cfg).eval()
    assert output_layer(model) is model.classifier.out_proj
    batches = cls_batches(3, batch=6)
    feats = []
    with torch.no_grad():
        for b in batches:
            first = model.roberta(input_ids=b["input_ids"]).last_hidden_state[:, 0]
            feats.append(torch.tanh(model.classifier.dense(first)).numpy())
    labels = [b["labels"].numpy() for b in batches]
    norm = cfg.initializer_range * np.sqrt(2 * cfg.hidden_size)
    _check_inside_and_after(
        model, batches, model.classifier.out_proj, _expected_rows(feats, labels, 2, norm)
    )


@pytest.mark.parametrize("case", ["one class", "float labels", "no labels", "causal lm"])
def test_centroid_head_leaves_the_model_alone_where_it_does_not_apply(case):
    model = tiny_llama(layers=2) if case == "causal lm" else tiny_bert(layers=2)
    batches = cls_batches(2)
    for b in batches:
        if case == "one class":
            b["labels"] = torch.zeros_like(b["labels"])
        elif case == "float labels":
            b["labels"] = b["labels"].float()
        elif case == "no labels":
            del b["labels"]
    before = [p.detach().clone() for p in model.parameters()]
    with centroid_head(model, batches) as used:
        assert not used
    assert all(torch.equal(p, old) for p, old in zip(model.parameters(), before))
    if case == "causal lm":
        assert output_layer(model) is None


def test_run_probe_statistics_do_not_depend_on_the_heads_seed(tmp_path):
    """Two models with one body and heads drawn from different seeds: with the centroid head
    the probe's gradients agree; with the loaded head they do not."""
    from entrolora.data import datasets as D
    from entrolora.job import TrainConfig, load_model, run_probe
    from test_data import save_tiny_model, write_csv

    folder, csv = save_tiny_model(tmp_path, "bert"), write_csv(tmp_path / "d.csv", 40)
    targets = ["attention.self.query", "attention.self.value"]

    def probe(seed: int, probe_head: str):
        cfg = TrainConfig(model=str(folder), data=str(csv), batch_size=8, probe_steps=4,
                          probe_head=probe_head, progress=False)  # fmt: skip
        ds = D.load_data(cfg.data, "text", "label", "classify")
        torch.manual_seed(seed)
        net, tok, _ = load_model(cfg.model, "classify", 2, ds.label_names)
        with torch.no_grad():  # a head unlike the saved one, drawn from the seed
            net.classifier.weight.normal_(0, 0.02)
        stats = run_probe(net, tok, ds, targets, cfg, torch.device("cpu"), report=False)
        return stats

    a, b = probe(1, "centroid"), probe(2, "centroid")
    assert a.meta["probe_head"] == b.meta["probe_head"] == "centroid"
    for name, g in a.gradients.items():
        torch.testing.assert_close(b.gradients[name], g, rtol=1e-5, atol=1e-9)
    c, d = probe(1, "model"), probe(2, "model")
    assert c.meta["probe_head"] == "model"
    assert any(not torch.allclose(c.gradients[n], d.gradients[n]) for n in c.gradients)


def test_bad_probe_head_is_refused():
    from entrolora.job import TrainConfig, validate_config

    with pytest.raises(ValueError, match="--probe-head must be one of centroid, model, got 'x'"):
        validate_config(TrainConfig(probe_head="x"))


def _centroid_worker(rank: int, world_size: int) -> dict:
    model = tiny_bert(layers=2, num_labels=3)  # same seed: same weights on every rank
    batches = cls_batches(5, batch=6, num_labels=3, seed=4)[rank::world_size]
    with centroid_head(model, batches) as used:
        return {"used": used, "weight": model.classifier.weight.detach().clone()}


def test_centroid_head_sums_classes_over_processes():
    """Two gloo processes with their own share of the batches build the head of all of them."""
    from dist_utils import run_distributed

    model = tiny_bert(layers=2, num_labels=3)
    with centroid_head(model, cls_batches(5, batch=6, num_labels=3, seed=4)):
        want = model.classifier.weight.detach().clone()
    for got in run_distributed(_centroid_worker, world_size=2):
        assert got["used"]
        torch.testing.assert_close(got["weight"], want, rtol=1e-5, atol=1e-7)


def test_library_probe_reads_through_the_centroid_head_by_default():
    """``el.probe`` itself (issue 33): two probes of a tiny classifier whose heads were drawn
    with different seeds give the same statistics with the default ``head="centroid"`` and
    different ones with ``head="model"``; the loaded head is put back."""
    import entrolora as el

    batches = cls_batches(6, batch=6, num_labels=3, seed=5)
    targets = ["attention.self.query", "attention.self.value"]

    def probe(seed: int, **kw):
        model = tiny_bert(layers=2, num_labels=3)
        torch.manual_seed(seed)
        model.classifier.reset_parameters()
        head = model.classifier.weight.detach().clone()
        stats = el.probe(model, iter(batches), targets, steps=6, progress=False, **kw)
        assert torch.equal(model.classifier.weight, head)
        return stats

    a, b = probe(1), probe(2)
    assert a.meta["probe_head"] == b.meta["probe_head"] == "centroid"
    for name, g in a.gradients.items():
        torch.testing.assert_close(b.gradients[name], g, rtol=1e-5, atol=1e-9)
        assert a[name].signal_std == pytest.approx(b[name].signal_std, rel=1e-5)
    c, d = probe(1, head="model"), probe(2, head="model")
    assert c.meta["probe_head"] == "model"
    assert any(not torch.allclose(c.gradients[n], d.gradients[n]) for n in c.gradients)
    assert any(c[n].std != pytest.approx(d[n].std, rel=1e-3) for n in c.gradients)


def test_library_probe_refuses_an_unknown_head():
    import entrolora as el

    with pytest.raises(ValueError, match="head must be 'centroid' or 'model', got 'x'"):
        el.probe(tiny_bert(layers=2), cls_batches(2), ["query"], steps=2, head="x")


def test_library_probe_of_a_causal_lm_records_no_head():
    import entrolora as el
    from tiny import lm_batches

    stats = el.probe(tiny_llama(layers=2), lm_batches(3), ["q_proj"], steps=3, progress=False)
    assert "probe_head" not in stats.meta
