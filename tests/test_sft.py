"""``--task sft``: rows, tokens, masks, length-grouped batches, teacher-forced exact match (equal
to greedy generation, checked per example), scores against float64 numpy, the job, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from entrolora.cli import app
from entrolora.data import sft as S
from entrolora.job import sft as J
from entrolora.job import train_run
from sft_tiny import TEMPLATE, save_tiny_sft_model, sft_rows, write_jsonl
from test_data import SPECIALS, tiny_tokenizer

EOS = SPECIALS.index("[EOS]")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return {
        "model": str(save_tiny_sft_model(root)),
        "plain": str(save_tiny_sft_model(root, template=False)),
        "data": str(write_jsonl(root / "d.jsonl", sft_rows(120))),
    }


def tok(template: bool = True):
    t = tiny_tokenizer()
    if template:
        t.chat_template = TEMPLATE
    return t


def cfg(assets, out, **kw):
    base = dict(model=assets["model"], data=assets["data"], method="lora", r=2, max_steps=4,
                batch_size=8, max_length=24, probe_steps=2, output=str(out), progress=False,
                report=False)  # fmt: skip
    return J.sft_config(**{**base, **kw})


# -- tokens and batches -----------
def test_prompt_through_template_and_completion_closed_by_eos():
    t = tok()
    ids = S.prompt_ids(t, "w3 w4", template=True)
    assert t.convert_ids_to_tokens(ids) == ["w70", "w3", "w4", "w71", "w72"]
    assert S.completion_ids(t, "good w1") == [t.convert_tokens_to_ids("good"), 6, EOS]
    assert S.prompt_ids(t, "w3 w4", template=False) == t("w3 w4")["input_ids"]
    assert not S.uses_template(tok(False), "auto") and not S.uses_template(t, "none")


def test_collate_labels_only_the_answer_right_and_left_padded():
    toks = S.SFTTokens([[10, 11, 12], [13]], [[20, EOS], [21, 22, EOS]], lengths=[5, 4])
    b = S.collate(toks, [0, 1], pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, EOS], [13, 21, 22, EOS, 0]]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 20, EOS], [-100, 21, 22, EOS, -100]]
    left = S.collate(toks, [0, 1], pad_id=0, left=True)
    assert left["input_ids"].tolist() == [[10, 11, 12, 20, EOS], [0, 13, 21, 22, EOS]]
    assert left["labels"].tolist()[1] == [-100, -100, 21, 22, EOS]
    assert left["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=300), st.integers(1, 9), st.integers(0, 5))
def test_grouped_batches_cover_every_row_once_in_sorted_groups(lengths, bs, seed):
    batches = S.grouped_batches(lengths, bs, seed, group=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= bs for b in batches)
    assert batches == S.grouped_batches(lengths, bs, seed, group=3)
    for b in batches:  # a batch is a slice of a length-sorted group
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    order = S.length_order_batches(lengths, bs)
    assert [lengths[i] for b in order for i in b] == sorted(lengths)


def test_grouped_batches_pad_less_than_random_ones():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 80, 2000).tolist()

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    rand = list(range(2000))
    np.random.default_rng(1).shuffle(rand)
    plain = [rand[j : j + 16] for j in range(0, 2000, 16)]
    assert padded(S.grouped_batches(lengths, 16, 0)) < 0.7 * padded(plain)


def test_messages_rows_take_the_last_assistant_turn_as_completion(tmp_path):
    turns = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w2"}]
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}] * 3)
    ds = S.load_sft(p)
    assert ds.prompts[0] == turns[:1] and ds.completions == ["w2"] * 3
    toks = S.tokenize(tok(), ds, 16, "auto")
    assert toks.prompt_ids[0] == S.prompt_ids(tok(), "w1 w2", True)


# -- exact match by teacher forcing = greedy generation -----------
def _fit(model, toks, steps=150, lr=3e-3):
    """Full fine-tuning of the tiny model, so that it answers some rows right, some wrong."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        for idx in S.grouped_batches(toks.lengths, 16, step)[:1]:
            loss = model(**S.collate(toks, idx, 0)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def greedy_matches(model, toks, eos=EOS, pad=0) -> list[bool]:
    """Per row: ``model.generate(do_sample=False)`` emits exactly the answer, then EOS."""
    out = []
    for p, c in zip(toks.prompt_ids, toks.completion_ids):
        ids = torch.tensor([p])
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=len(c), eos_token_id=eos, pad_token_id=pad)  # fmt: skip
        out.append(g[0, len(p) :].tolist() == c)
    return out


def test_teacher_forced_exact_match_equals_greedy_generation(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    t = tok()
    train = S.tokenize(t, S.load_sft(assets["data"]), 24, "auto")
    rows = sft_rows(60, seed=7)
    held_out = S.SFTDataset([r["prompt"] for r in rows], [r["completion"] for r in rows])
    test = S.tokenize(t, held_out, 24, "auto")
    for fitted in (False, True):
        if fitted:
            _fit(model, train)
        ok, _, _ = J.teacher_forced(model, test, 7, torch.device("cpu"), 0)
        assert ok == greedy_matches(model, test)
    assert 0 < sum(ok) < len(ok), sum(ok)  # both outcomes occur, so the comparison can fail


def test_scores_match_a_float64_reference(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    ds = S.load_sft(assets["data"]).take(range(30))
    toks = S.tokenize(tok(), ds, 24, "auto")
    got = J.evaluate_sft(model, toks, 8, torch.device("cpu"), 0)
    per = {}
    for i in range(len(toks)):  # one unpadded row at a time, full logits, numpy float64
        seq = toks.prompt_ids[i] + toks.completion_ids[i]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([seq])).logits[0].double().numpy()
        n_p = len(toks.prompt_ids[i])
        z = z[n_p - 1 : len(seq) - 1]
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        target = np.array(toks.completion_ids[i])
        nll = -logp[np.arange(len(target)), target]
        per[i] = (bool((z.argmax(1) == target).all()), nll.sum(), len(target))
    ok, loss, n = zip(*per.values())
    assert got["exact_match"] == pytest.approx(sum(ok) / 30)
    assert got["eval_loss"] == pytest.approx(sum(loss) / sum(n), rel=1e-5)
    for c, s in got["by_category"].items():
        rows = [i for i in range(30) if ds.categories[i] == c]
        assert s["eval_examples"] == len(rows)
        assert s["eval_loss"] == pytest.approx(
            sum(loss[i] for i in rows) / sum(n[i] for i in rows), rel=1e-5
        )


# -- the job -----------
def test_train_run_sft_scores_reports_and_learns(assets, tmp_path):
    res = train_run(cfg(assets, tmp_path / "run", max_steps=None, epochs=30, lr=1e-2, r=8,
                        report=True))  # fmt: skip
    m = json.loads((res.output / "metrics.json").read_text())
    assert m["task"] == "sft" and m["accuracy"] == m["exact_match"]
    assert set(m["by_category"]) == {"sentiment", "copy"}
    assert m["eval_examples"] == 24 and m["train_examples"] == 96
    losses = res.losses  # untrained: exact match 0, answer loss ≈ ln 89 = 4.49
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3 and m["exact_match"] > 0
    html = (res.output / "report.html").read_text()
    assert "Exact match by category" in html and "sentiment" in html
    assert (
        json.loads((res.output / "peft" / "adapter_config.json").read_text())["task_type"]
        == "CAUSAL_LM"
    )
    lines = J.summary_lines(m)
    assert lines[0].startswith("exact match") and len(lines) == 3


def test_probe_batches_carry_the_answer_only_loss(assets, tmp_path):
    from entrolora.job.probe import calibration_batches

    c = cfg(assets, tmp_path / "x")
    train, _ = J.load_sft_splits(c)
    toks = S.tokenize(tok(), train, 24, "auto")
    b = calibration_batches(tok(), toks, c, torch.device("cpu"))[0]
    ends = b["labels"] == EOS
    assert int(ends.sum()) == len(b["labels"])  # one EOS label per row: every answer closed
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_probed_method_trains_under_sft(assets, tmp_path):
    res = train_run(cfg(assets, tmp_path / "e2", method="e2lora"))
    assert res.stats is not None and res.metrics["steps"] == 4


def test_cli_train_sft_prints_exact_match(assets, tmp_path):
    r = CliRunner().invoke(app, ["train", "--task", "sft", "--model", assets["model"], "--data",
                                 assets["data"], "--method", "lora", "--max-steps", "2",
                                 "--max-length", "24", "--quiet", "--output",
                                 str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "exact match" in r.output and "sentiment" in r.output


def test_sft_defaults_fill_only_what_was_not_given():
    from entrolora.job import TrainConfig

    c = J.with_sft_defaults(TrainConfig(task="sft", batch_size=4), {"batch_size"})
    assert c.batch_size == 4 and c.max_steps == J.SFT_DEFAULTS["max_steps"]
    assert c.model == "smollm2" and c.sft.eval_limit == J.SFT_EVAL_LIMIT
    own = J.with_sft_defaults(TrainConfig(task="sft", data="x.jsonl"), set())
    assert own.sft.eval_limit is None  # a user's file is scored whole


# -- bad input: one line each -----------
def test_missing_columns_name_the_columns_found(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"no 'prompt' or 'completion' column \(columns: "
                                         r"question, answer\); pass --prompt-column"):  # fmt: skip
        S.load_sft(p)
    assert len(S.load_sft(p, S.SFTOptions(prompt_column="question",
                                          completion_column="answer"))) == 1  # fmt: skip


def test_empty_completion_is_refused(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                           {"prompt": "c", "completion": "  "}])  # fmt: skip
    with pytest.raises(ValueError, match="row 2 of d.jsonl's 'completion' is an empty completion"):
        S.load_sft(p)


def test_prompt_longer_than_max_length_says_how_many_and_how_long(tmp_path):
    long = " ".join(["w5"] * 30)
    rows = [{"prompt": long, "completion": "w1"}] * 2 + [{"prompt": "w2", "completion": "w1"}]
    ds = S.load_sft(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(ValueError, match=r"2 of 3 rows of d.jsonl have a prompt of --max-length "
                                         r"16 tokens or more \(longest 33\)"):  # fmt: skip
        S.tokenize(tok(), ds, 16, "auto")
    ok = S.load_sft(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "w2", "completion": long}]))
    msg = r"1 of 1 rows .* longer than --max-length 16 tokens with their completion and EOS"
    with pytest.raises(ValueError, match=msg + r" \(longest 35\)"):
        S.tokenize(tok(), ok, 16, "auto")


def test_model_without_a_causal_lm_head(tmp_path, assets):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from test_data import save_tiny_model

    d = tmp_path / "distil"
    DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=89, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64
    )).save_pretrained(d)  # fmt: skip
    tiny_tokenizer().save_pretrained(d)
    with pytest.raises(ValueError, match="has no causal-LM head in transformers; use a decoder"):
        train_run(cfg(assets, tmp_path / "o", model=str(d)))
    bert = save_tiny_model(tmp_path, "bert")  # loads as BertLMHeadModel, but reads both ways
    with pytest.raises(ValueError, match="--task sft needs a model that reads left to right"):
        train_run(cfg(assets, tmp_path / "o", model=str(bert)))


def test_chat_template_that_cannot_render_the_messages(tmp_path):
    turns = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"},
             {"role": "assistant", "content": "w3"}]  # fmt: skip
    ds = S.load_sft(write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}]))
    with pytest.raises(ValueError, match=r"the tokenizer's chat template cannot render row 1 of "
                                         r"m.jsonl \(no system turns\)"):  # fmt: skip
        S.tokenize(tok(), ds, 32, "auto")
    with pytest.raises(ValueError, match="holds chat turns but no chat template is used"):
        S.tokenize(tok(), ds, 32, "none")


def test_sft_option_checks(assets, tmp_path):
    with pytest.raises(ValueError, match="--chat-template must be auto or none"):
        train_run(cfg(assets, tmp_path / "o", sft=S.SFTOptions(chat_template="chatml")))
    with pytest.raises(ValueError, match="--eval-split picks a split of the shipped math set"):
        train_run(cfg(assets, tmp_path / "o", sft=S.SFTOptions(eval_split="validation")))
    c = cfg(assets, tmp_path / "o")
    with pytest.raises(ValueError, match="--category-column 'kind' is not in d.jsonl"):
        train_run(replace(c, sft=S.SFTOptions(category_column="kind")))


def test_cli_bad_sft_input_is_one_line(assets, tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}] * 4)
    r = CliRunner().invoke(app, ["train", "--task", "sft", "--model", assets["model"], "--data",
                                 str(p), "--quiet", "--output", str(tmp_path / "o")])  # fmt: skip
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "columns: question, answer" in err, err
    assert not Path(tmp_path / "o").exists()


def test_cli_probe_reads_the_sft_loss(assets, tmp_path):
    out = tmp_path / "s.safetensors"
    r = CliRunner().invoke(app, ["probe", "--task", "sft", "--model", assets["model"], "--data",
                                 assets["data"], "--probe-steps", "2", "--max-length", "24",
                                 "--quiet", "--output", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    from entrolora.stats import GradientStats

    assert len(GradientStats.load(out)) == 8  # 2 layers × q, k, v, o
