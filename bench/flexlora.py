"""Step time and peak memory of FlexLoRA next to peft LoRA and peft AdaLoRA, in the same run.

    python bench/flexlora.py            # CUDA: Llama-1.1B shape, bf16, batch 8×512
    python bench/flexlora.py --smoke    # tiny Llama on the CPU, a few steps (CI)

Every method trains a fresh random Llama of the same shape with AdamW on the same random tokens:
peft LoRA r=8, peft AdaLoRA (init_r 12 → target_r 8, its own orthogonality term and budget
schedule), FlexLoRA (r=8, capacity 2r, regulariser in the loss, rank moves every ``--interval``
steps). A step is forward + backward + controller + ``optimizer.step()`` + ``zero_grad``; figures
are medians (and means, which include the adjustment steps) over the timed steps after warm-up,
and ratios are against peft LoRA measured in the same run. The target (issue 5): FlexLoRA ≤ 1.10×
peft LoRA time.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Result:
    method: str
    trainable: int
    median_ms: float
    mean_ms: float
    peak_mib: float | None
    adapter_dtype: str


def llama_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    # TinyLlama-1.1B's shape (as bench/adapters.py).
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def base_model(cfg, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


Hooks = tuple[Callable[[], torch.Tensor] | None, Callable | None, Callable | None]


def setup_lora(model, targets, total, args):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, cfg), (None, None, None)


def setup_adalora(model, targets, total, args):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(
        init_r=12,
        target_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=targets,
        tinit=args.warmup,
        tfinal=1,
        deltaT=args.interval,
        total_step=total,
    )
    peft_model = get_peft_model(model, cfg)
    # After optimizer.step(), before zero_grad (peft's documented order): it reads the gradients.
    return peft_model, (None, None, lambda t, opt: peft_model.base_model.update_and_allocate(t))


def setup_flexlora(model, targets, total, args):
    import entrolora as el

    plan = el.plan_flexlora(model, r=8, capacity=16, target_modules=targets)
    model = el.apply(model, plan)
    flex = el.FlexLoRA(
        model, total_steps=total, b0=4, t_warmup=args.warmup, t_final=0, interval=args.interval
    )
    return model, (flex.regularizer, lambda t, opt: flex.step(t, opt), None)


METHODS = {
    "peft LoRA r=8": setup_lora,
    "peft AdaLoRA 12→8": setup_adalora,
    "FlexLoRA r=8 c=16": setup_flexlora,
}


def run_one(name, setup, args, cfg, device, dtype, batch) -> Result:
    targets = args.targets.split(",")
    total = args.warmup + args.steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, (extra_loss, before_step, after_step) = setup(
        base_model(cfg, device, dtype), targets, total, args
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for t in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        if before_step is not None:
            before_step(t, opt)
        opt.step()
        if after_step is not None:
            after_step(t, opt)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if t >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = Result(
        name,
        sum(p.numel() for p in params),
        1e3 * statistics.median(times),
        1e3 * statistics.fmean(times),
        peak,
        str(params[0].dtype).removeprefix("torch."),
    )
    del model, opt, params
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; smoke 1)")
    ap.add_argument("--interval", type=int, default=None, help="rank-move period (default 10)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 8; smoke 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512)")
    ap.add_argument("--targets", default=TARGETS, help="comma-separated target modules")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    small = not cuda
    args.steps = args.steps or (3 if small else 30)
    args.warmup = args.warmup or (1 if small else 5)
    args.interval = args.interval or (2 if small else 10)
    args.batch = args.batch or (2 if small else 8)
    args.seq = args.seq or (16 if small else 512)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = llama_config(small)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    shape = "tiny Llama (smoke)" if small else "Llama-1.1B shape"
    print(
        f"{shape} on {torch.cuda.get_device_name() if cuda else 'CPU'}, {dtype}, batch "
        f"{args.batch}×{args.seq}, targets {args.targets}; {args.warmup} warm-up + "
        f"{args.steps} timed steps; torch {torch.__version__}"
    )
    results = [run_one(n, s, args, cfg, device, dtype, batch) for n, s in METHODS.items()]
    ref = results[0]
    print(
        f"{'method':<20} {'trainable':>11} {'median ms':>10} {'mean ms':>9} {'× LoRA':>7} "
        f"{'peak MiB':>9} {'× LoRA':>7} {'adapter':>8}"
    )
    for r in results:
        mem = (
            f"{r.peak_mib:9.0f} {r.peak_mib / ref.peak_mib:7.3f}"
            if r.peak_mib
            else f"{'n/a':>9} {'':>7}"
        )
        print(
            f"{r.method:<20} {r.trainable:>11,} {r.median_ms:10.2f} {r.mean_ms:9.2f} "
            f"{r.median_ms / ref.median_ms:7.3f} {mem} {r.adapter_dtype:>8}"
        )
    return results


if __name__ == "__main__":
    main()
