"""Model shapes of the speed benchmarks, one definition for every ``--shape`` option.

- ``toy``: a tiny random Llama for CI (``--smoke``): seconds, overhead-bound;
- ``smollm2``: random weights at SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 kv
  heads, intermediate 1536, its real vocabulary of 49,152 with tied embeddings: 134.5M
  parameters), float32 on the CPU, batch 2×64: large enough that matrix products, not Python,
  set a step's time (a few seconds on 2 cores);
- ``llama-1b``: TinyLlama-1.1B's shape (22 layers, hidden 2048, intermediate 5632, 32 heads / 4
  kv heads), bf16 on CUDA, batch 8×512: the GPU figures.

``SHAPES[name]`` holds ``LlamaConfig`` fields plus ``batch``/``seq`` and the device and dtype
the shape is measured on; scripts take their step counts from their own defaults.
"""

from __future__ import annotations

from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "toy": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                batch=2, seq=16, device="cpu", dtype="fp32"),
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    tie_word_embeddings=True, batch=2, seq=64, device="cpu", dtype="fp32"),
    "llama-1b": dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                     batch=8, seq=512, device="cuda", dtype="bf16"),
}  # fmt: skip
WORKLOAD = ("batch", "seq", "device", "dtype")


def add_shape_option(parser, default: str | None = None) -> None:
    """``--shape {toy,smollm2,llama-1b}`` on an argparse parser (one spelling everywhere)."""
    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        default=default,
        help="model shape: toy (CI), smollm2 (SmolLM2-135M's, CPU fp32), llama-1b (CUDA bf16)",
    )


def default_shape(smoke: bool, cuda: bool) -> str:
    """``toy`` for ``--smoke`` or without CUDA, else ``llama-1b``."""
    return "toy" if smoke or not cuda else "llama-1b"


def llama_config(shape: str, **overrides: Any):
    """A ``LlamaConfig`` of ``shape`` (its model fields only), with ``overrides`` applied."""
    from transformers import LlamaConfig

    fields = {k: v for k, v in SHAPES[shape].items() if k not in WORKLOAD}
    fields.update(overrides)
    seq = SHAPES[shape]["seq"]
    return LlamaConfig(max_position_embeddings=max(2048, seq), **fields)


def describe(shape: str) -> str:
    """One line: ``smollm2: 30 layers, hidden 576, … batch 2×64, fp32 on cpu``."""
    s = SHAPES[shape]
    return (
        f"{shape}: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, intermediate "
        f"{s['intermediate_size']}, {s['num_attention_heads']} heads / "
        f"{s['num_key_value_heads']} kv, vocab {s['vocab_size']}, batch {s['batch']}×{s['seq']}, "
        f"{s['dtype']} on {s['device']}"
    )
