"""Tiny random Hugging Face models built from configs, and batches for them (tests only)."""

from __future__ import annotations

import torch

VOCAB = 96


def tiny_llama(layers: int = 4, hidden: int = 32, seed: int = 0, num_labels: int | None = None):
    """A random Llama (GQA: 4 heads, 2 kv heads); a classifier when ``num_labels`` is given."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    if num_labels:
        cfg.num_labels = num_labels
        return LlamaForSequenceClassification(cfg).eval()
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 4, hidden: int = 32, seed: int = 0):
    """A random GPT-2, whose attention and MLP projections are transformers' Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers: int = 4, hidden: int = 32, seed: int = 0, num_labels: int = 2):
    """A random BERT sequence classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def lm_batches(n: int, batch: int = 2, seq: int = 8, seed: int = 0) -> list[dict]:
    """``n`` causal-LM batches: ``input_ids`` and ``labels`` (the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def cls_batches(
    n: int, batch: int = 4, seq: int = 8, num_labels: int = 2, seed: int = 0
) -> list[dict]:
    """``n`` sequence-classification batches: ``input_ids``, ``attention_mask``, ``labels``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, num_labels, (batch,), generator=g),
            }
        )
    return out
