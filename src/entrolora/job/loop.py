"""Training and evaluation: the optimizer, the learning-rate schedule, the step loop and the
held-out scores. Loss curves come back as one float per optimizer step."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .baselines import loraplus_optimizer
from .config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (data order, dropout, peft's init)."""
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """``(MiB, kind)``: CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    import resource

    # ru_maxrss is in KiB on Linux: the whole process's peak, model loading and data included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_ru_maxrss"


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak over ``warmup`` steps, then linear decay to 0 at ``total``.

    Written out because neither library gives exactly this schedule: transformers'
    ``get_linear_schedule_with_warmup`` starts at 0 (the first step is lost), and torch's
    ``SequentialLR`` of two ``LinearLR`` divides by zero when ``warmup == total``.
    """

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def adamw(
    params: Sequence[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """torch's AdamW over ``params``, fused (one pass over each tensor instead of about a dozen:
    ~4× less optimizer time on a CPU, bench/flexlora/flexlora.py) where torch has the fused kernel
    for them: plain float tensors on one CPU or CUDA device. Else (sharded DTensors under FSDP2,
    parameters on several devices) torch's default implementation. The same update either way,
    to rounding."""
    devices = {p.device.type for p in params}
    fused = (
        len(devices) == 1
        and devices <= {"cpu", "cuda"}
        and all(type(p.data) is torch.Tensor and p.dtype in _FUSED_DTYPES for p in params)
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def make_optimizer(
    model: nn.Module, method: str, cfg: TrainConfig, opts: Mapping[str, Any], total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(AdamW over the trainable parameters, its warm-up/decay schedule)``."""
    if method == "lora-plus":
        optimizer = loraplus_optimizer(model, cfg, opts)
    else:
        # parameters() yields a shared factor once, so it is stepped once
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters after applying the plan")
        optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))


def count_params(model: nn.Module, head_prefixes: Sequence[str]) -> tuple[int, int]:
    """``(adapter params, head params)`` that require grad; shared tensors counted once."""
    adapter = head = 0
    for name, p in model.named_parameters():  # named_parameters() skips repeats of a tensor
        if not p.requires_grad:
            continue
        if any(h in name.split(".") for h in head_prefixes):
            head += p.numel()
        else:
            adapter += p.numel()
    return adapter, head


def train_steps(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    total: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    flex: Any = None,
    after_step: Callable[[int], None] | None = None,
    bar: Any = None,
) -> list[float]:
    """Run up to ``total`` optimizer steps over ``batches``; the task loss of each step.

    The FlexLoRA controller (``flex``) adds its regulariser to the loss and reallocates
    after backward, before the optimizer step; ``after_step(step)`` runs after it (AdaLoRA).
    """
    losses: list[float] = []
    model.train()
    for batch in batches:
        if len(losses) >= total:
            break
        step = len(losses)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if not torch.isfinite(loss):
            raise ValueError(f"training loss became {float(loss)} at step {step}; lower --lr")
        (loss + flex.regularizer() if flex is not None else loss).backward()
        if flex is not None:
            flex.step(step, optimizer)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach().item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{mean_tail(losses):.4f}")
    return losses


def mean_tail(losses: Sequence[float], n: int = 20) -> float:
    """Mean of the last ``n`` losses (the smoothed figure the bar and metrics show)."""
    tail = losses[-n:]
    return sum(tail) / max(1, len(tail))


def evaluate(
    model: nn.Module, batches: Sequence[dict], task: str, device: torch.device, bar: Any = None
) -> dict:
    """Held-out loss (per example / per token) and accuracy (classify) or perplexity (causal).

    ``bar`` (``progress.progress_bar``, total = the examples) advances by each batch's examples.
    """
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "classify":
                loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += int(labels.numel())
            else:
                shift, target = logits[:, :-1], labels[:, 1:]
                flat = shift.reshape(-1, shift.shape[-1])
                loss_sum += float(
                    nn.functional.cross_entropy(
                        flat, target.reshape(-1), ignore_index=-100, reduction="sum"
                    )
                )
                count += int((target != -100).sum())
            if bar is not None:
                bar.update(int(labels.shape[0]))
    if count == 0:
        raise ValueError("the held-out split produced no labels to evaluate; use more data")
    out: dict[str, Any] = {"eval_loss": loss_sum / count, "eval_examples": count}
    if task == "classify":
        out["accuracy"] = correct / count
    else:
        out["perplexity"] = math.exp(min(out["eval_loss"], 50.0))
        out["accuracy"] = None
    return out
