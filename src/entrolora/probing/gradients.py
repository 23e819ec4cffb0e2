"""The gradient probe: accumulated full-weight gradients of the target modules (METHODS.md §1).

    G = (1/S) · Σ_s ∂loss(b_s)/∂W        accumulated in float32 whatever the model dtype

One pass of ``S`` forward+backward steps, nothing stepped. Only the target weights require grad.
Each target gradient is folded into its float32 accumulator by a post-accumulate-grad hook the
moment autograd has produced it, and ``p.grad`` is dropped right there, so at most one target
gradient is alive beyond the accumulators (the plain training step holds all of them at the end
of its backward). The hook fires after the last contribution to the weight's gradient in every
backward, the last batch's included, and exactly once per backward with gradient checkpointing.

The accumulators are two half-sums, of the even and of the odd batches (``sums``): their
total is ``S·G`` and their difference the noise estimate ``D`` of METHODS.md §2, at no extra
forward or backward. Under ``torch.distributed`` each process passes its own batches; a batch's
half is the parity of its global index (``rank + i·world_size``, as ``distributed.shard`` deals
them); the half-sums and the batch counts are all-reduced once at the end, so every process
returns the statistics of the mean gradient over the union of all processes' batches.

The model's mode is left as the caller set it (eval is what you want: no dropout noise in the
measurement; HF models load in eval mode). Gradient checkpointing only acts in train mode in
transformers, so a checkpointed probe is a probe in train mode.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..adapters.inject import unwrap
from ..progress import progress_bar
from ..stats import GradientStats
from ..targets import find_targets
from .comm import all_reduce_sum, rank_world, to_device
from .head import HEADS, centroid_head, output_layer
from .moments import BatchMoments, all_reduce_moments, type_covariances
from .sums import HalfSums, HostHalfSums, mean_and_noise

LossFn = Callable[[nn.Module, Any], torch.Tensor]
OFFLOADS = (None, "cpu")


Sums = HalfSums | HostHalfSums


# -- helpers ---------------------------------------------------------------------------------
def _check_not_sharded(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """ValueError for FSDP/FSDP2/DeepSpeed wrappers and sharded weights, with the workaround."""
    fix = (
        "Run entrolora.probe on the plain model before wrapping it (every process can hold the "
        "full target weights while probing; only their gradients are accumulated), then wrap."
    )
    wrappers = {"FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"}
    for module in model.modules():
        cls = type(module).__name__
        if wrappers & {c.__name__ for c in type(module).__mro__}:
            raise ValueError(
                f"probe does not support models wrapped in {cls} (sharded weights and gradients "
                f"would give partial statistics). {fix}"
            )
    for name, w in weights.items():
        kinds = {c.__name__ for c in type(w).__mro__}
        sharded = (
            "DTensor" in kinds
            or "FlatParameter" in kinds
            or hasattr(w, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter
            or getattr(w, "_is_sharded", False)
            or not isinstance(w, nn.Parameter)  # FSDP1 replaces weights by views of a flat one
        )
        if not sharded and not w.is_floating_point():
            raise ValueError(
                f"target weight {name!r} is {w.dtype} (a quantized layer?); the probe needs "
                "floating-point weights to take gradients. Probe the unquantized model (bf16 "
                "is fine), then quantize."
            )
        if sharded:
            raise ValueError(
                f"target weight {name!r} is sharded or not a parameter ({type(w).__name__}); "
                f"FSDP / ZeRO-3 weights are not supported by probe. {fix}"
            )


def _input_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _loss_of(model: nn.Module, batch: Any, loss_fn: LossFn | None, step: int) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"batch {step} is a {type(batch).__name__}, not a dict; probe feeds batches as "
                "model(**batch). Pass dicts, or a loss_fn(model, batch)."
            )
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(
                f"model output of batch {step} has no .loss; include labels in the batch "
                "(Hugging Face convention) or pass loss_fn(model, batch)."
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss of batch {step} must be a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss of batch {step} does not depend on any target weight (no gradient "
            "flows); check target_modules, or that loss_fn does not run under torch.no_grad."
        )
    return loss.reshape(())


def _reduce_counts(counts: tuple[int, int], failed: bool) -> tuple[tuple[int, int], int]:
    """``((even batches, odd batches), failed processes)`` over all processes, one collective."""
    status = torch.tensor([counts[0], counts[1], int(failed)], dtype=torch.int64)
    all_reduce_sum(status)
    return (int(status[0]), int(status[1])), int(status[2])


def _check_args(steps: Any, offload: Any, loss_fn: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (number of batches), got {steps!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")


def _distinct_weights(
    modules: Mapping[str, nn.Module],
) -> tuple[list[nn.Parameter], dict[str, int], dict[int, list[str]]]:
    """One accumulator per distinct weight (tied targets share one): ``(params, slot of each
    target, targets of each slot)``."""
    params: list[nn.Parameter] = []
    slot_of: dict[str, int] = {}
    index: dict[int, int] = {}
    for name, m in modules.items():
        w = m.weight
        if id(w) not in index:
            index[id(w)] = len(params)
            params.append(w)
        slot_of[name] = index[id(w)]
    owners = {i: [n for n, j in slot_of.items() if j == i] for i in range(len(params))}
    return params, slot_of, owners


@contextmanager
def _probing_state(net: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside; ``requires_grad``, ``.grad`` and train/eval modes of
    the whole model are restored on exit, also on error."""
    all_params = list(net.parameters())
    saved_requires = [p.requires_grad for p in all_params]
    saved_grads = [p.grad for p in all_params]
    saved_modes = [(m, m.training) for m in net.modules()]
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        yield
    finally:
        for p, req, g in zip(all_params, saved_requires, saved_grads):
            p.requires_grad_(req)
            p.grad = g
        for m, mode in saved_modes:
            m.training = mode


# -- the probe -------------------------------------------------------------------------------
def probe(
    model: nn.Module,
    batches: Iterable[Any],
    target_modules: str | Sequence[str],
    steps: int = 64,
    *,
    loss_fn: LossFn | None = None,
    offload: str | None = None,
    allow_fewer: bool = False,
    progress: bool = True,
    keep_gradients: bool = True,
    head: str = "centroid",
) -> GradientStats:
    """Accumulate the target weights' gradients over ``steps`` batches; their statistics.

    ``batches``: dicts fed as ``model(**batch)`` (loss from ``.loss``), or anything ``loss_fn``
    (``loss_fn(model, batch) -> scalar``) takes; tensors are moved to the model's device.
    ``target_modules``: suffixes, full names or one regex (``find_targets``). ``offload="cpu"``
    keeps the float32 accumulators in pinned host memory (CUDA models). ``allow_fewer``: fewer
    batches than ``steps`` is accepted (else a ValueError). Returns ``GradientStats`` of
    ``G = mean of the gradients`` (METHODS.md §1–2) with sensitivities (RaLoRA eq. 5) and, from
    two batches on, the noise estimate of §2 (half-sums of the even and odd batches, no extra
    pass) and the signal statistics; from three batches on, ``moment_cov``: each type's sampling
    covariance of its modules' moments (``probing/moments.py``, for E²LoRA's significance gate; not
    measured under an even world size, see docs/methods.md); the gradients kept when
    ``keep_gradients``. Under
    ``torch.distributed`` every process returns the statistics of the mean over all processes'
    batches; a batch's half is the parity of its global index ``rank + i·world_size``, the order
    in which ``entrolora.distributed.shard`` deals batches (a DDP-wrapped model is probed through
    ``model.module``, so names carry no ``module.`` prefix; FSDP/ZeRO-3 models are refused:
    probe before wrapping). Parameters' ``requires_grad`` and ``.grad`` and modules'
    train/eval mode are restored, also on error; the mode is not changed (eval: no dropout).
    ``head`` (a sequence classifier only: a ``classifier``/``score`` head): ``"centroid"`` probes
    through the centroid head of the batches (``probe_head.centroid_head``; the loaded head is
    put back after), ``"model"`` through the loaded head; ``meta["probe_head"]`` says which was
    used (the centroid needs integer ``labels`` of two classes or more in dict batches).
    """
    from ..guards.api import need_model

    need_model(model, "el.probe")
    if isinstance(batches, (str, bytes, os.PathLike)) or not hasattr(batches, "__iter__"):
        raise TypeError(
            f"el.probe: batches must be an iterable of batches (dicts of tensors, or what "
            f"loss_fn takes), got {type(batches).__name__} {str(batches)[:60]!r}; read and "
            "tokenize the data first"
        )
    _check_args(steps, offload, loss_fn)
    if head not in HEADS:
        raise ValueError(f"head must be 'centroid' or 'model', got {head!r}")
    net = unwrap(model)
    layer = output_layer(net)
    centroid = layer is not None and head == "centroid"
    if centroid:
        batches = list(itertools.islice(batches, steps))  # read twice: centroid, then probe
    with centroid_head(net, batches) if centroid else nullcontext(False) as used:
        stats = _probe(net, batches, target_modules, steps, loss_fn, offload, allow_fewer,
                       progress, keep_gradients)  # fmt: skip
    if layer is not None:
        stats.meta["probe_head"] = "centroid" if used else "model"
    return stats


def _probe(
    net: nn.Module,
    batches: Iterable[Any],
    target_modules: str | Sequence[str],
    steps: int,
    loss_fn: LossFn | None,
    offload: str | None,
    allow_fewer: bool,
    progress: bool,
    keep_gradients: bool,
) -> GradientStats:
    """``probe`` on the unwrapped model, its head in place."""
    targets = find_targets(net, target_modules)
    modules = {name: net.get_submodule(name) for name in targets}
    _check_not_sharded(net, {name: m.weight for name, m in modules.items()})
    params, slot_of, owners = _distinct_weights(modules)
    on_cuda = any(p.device.type == "cuda" for p in params)
    sums_kind = HostHalfSums if (offload == "cpu" and on_cuda) else HalfSums
    with _probing_state(net, params):
        sums = sums_kind(params)
        try:
            counts = _accumulate(net, params, batches, steps, loss_fn, sums, owners, progress)
            if counts[0] + counts[1] < steps and not allow_fewer:  # raised on every rank alike
                raise ValueError(
                    f"batches ran out after {sum(counts)} of steps={steps} batches; pass more "
                    f"batches, steps={sum(counts)}, or allow_fewer=True"
                )
            means, noises = mean_and_noise(sums.finish(), counts)
            moments = sums.moments.sums
        finally:
            sums.close()
    meta = {
        "model": type(net).__name__,
        "target_modules": target_modules
        if isinstance(target_modules, str)
        else list(target_modules),
        "steps": sum(counts),
        "halves": list(counts),
        "world_size": rank_world()[1],
        "dtype": str(params[0].dtype).removeprefix("torch."),
        # the whole model's parameters (each shared one once): a budget given as a fraction of
        # the model (the auto planner, METHODS.md §7) reads it
        "model_params": sum(p.numel() for p in net.parameters()),
    }
    by_name = {name: slot_of[name] for name in targets}
    stats = _statistics(targets, modules, by_name, means, noises, meta, keep_gradients)
    return _with_moment_noise(stats, by_name, moments)


def _with_moment_noise(
    stats: GradientStats, slot_of: Mapping[str, int], moments: BatchMoments
) -> GradientStats:
    """``stats`` with the sampling covariance of each type's moments (``probing/moments.py``); none
    without a noise estimate or below three batches."""
    if not stats.has_noise:
        return stats
    cov = type_covariances(stats.modules, stats.types, slot_of, moments)
    return replace(stats, moment_cov=cov or None)


def _statistics(
    targets: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    slot_of: Mapping[str, int],
    means: Sequence[torch.Tensor],
    noises: Sequence[torch.Tensor] | None,
    meta: dict,
    keep_gradients: bool,
) -> GradientStats:
    """``GradientStats`` of the per-weight mean gradients and noise estimates, per target name."""
    grads: dict[str, torch.Tensor] = {}
    noise: dict[str, torch.Tensor] | None = None if noises is None else {}
    weights: dict[str, torch.Tensor] = {}
    for name, t in targets.items():
        # Conv1D stores (d_in, d_out): statistics and plans use the (d_out, d_in) orientation.
        def oriented(x: torch.Tensor, t=t) -> torch.Tensor:
            return x.T if t.transposed else x

        grads[name] = oriented(means[slot_of[name]])
        weights[name] = oriented(modules[name].weight.detach())
        if noise is not None:
            noise[name] = oriented(noises[slot_of[name]])
    return GradientStats.from_gradients(
        grads,
        weights,
        noise=noise,
        steps=meta["steps"],
        keep_gradients=keep_gradients,
        meta=meta,
        device=next(iter(weights.values())).device,  # on the accelerator even when offloaded
    )


def _accumulate(
    net: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Iterable[Any],
    steps: int,
    loss_fn: LossFn | None,
    sums: Sums,
    owners: Mapping[int, list[str]],
    progress: bool,
) -> tuple[int, int]:
    """Run the batches with the accumulating hooks; ``(even, odd)`` batch counts over all
    processes, the half-sums all-reduced. Every process raises if any one failed."""
    rank, world = rank_world()
    finite: dict[int, torch.Tensor] = {}

    def make_hook(i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g = p.grad
            finite[i] = torch.isfinite(g).all()  # stays on the device: no sync here
            sums.add(i, g)
            p.grad = None  # free it now: at most one target gradient alive at a time

        return hook

    handles = [p.register_post_accumulate_grad_hook(make_hook(i)) for i, p in enumerate(params)]
    bar = progress_bar(steps, "probe", progress)  # tqdm shows the rate in step/s
    counts, error = (0, 0), None
    try:
        device = _input_device(net)
        counts = _run(net, batches, steps, loss_fn, device, sums, finite, owners, bar, rank, world)
        if sum(counts) == 0:
            raise ValueError("batches is empty; the probe needs at least one batch")
    except Exception as e:  # in a process group the peers must still learn that we failed
        error = e
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if world > 1:
        counts, failed = _reduce_counts(counts, error is not None)
        if error is None and failed:
            raise ValueError(
                f"the probe failed on {failed} other process(es) of {world}; see their error"
            )
    if error is not None:
        raise error
    if world > 1:
        for half in sums.finish():
            for acc in half:
                all_reduce_sum(acc)
        all_reduce_moments(sums.moments.sums, all_reduce_sum)
    return counts


def _run(
    net: nn.Module,
    batches: Iterable[Any],
    steps: int,
    loss_fn: LossFn | None,
    device: torch.device,
    sums: Sums,
    finite: dict[int, torch.Tensor],
    owners: Mapping[int, list[str]],
    bar: Any,
    rank: int,
    world: int,
) -> tuple[int, int]:
    """Forward+backward over up to ``steps`` batches; ``(even, odd)`` batches seen here, the
    half of local batch i being the parity of its global index ``rank + i·world``."""
    counts = [0, 0]
    iterator = iter(batches)
    with torch.enable_grad():
        for step in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            half = (rank + step * world) % 2
            sums.begin_step(half)
            finite.clear()
            loss = _loss_of(net, to_device(batch, device), loss_fn, step)
            loss.backward()
            sums.end_step()
            _check_step(loss, finite, owners, step)
            counts[half] += 1
            bar.update(1)
    return counts[0], counts[1]


def _check_step(
    loss: torch.Tensor,
    finite: Mapping[int, torch.Tensor],
    owners: Mapping[int, list[str]],
    step: int,
) -> None:
    """One host sync per step, as a training loop's loss.item(): loss and gradients checked."""
    order = sorted(finite)
    flags = [torch.isfinite(loss.detach())] + [finite[i].to(loss.device) for i in order]
    ok = torch.stack(flags).cpu()
    if not bool(ok[0]):
        raise ValueError(
            f"the loss of batch {step} is {float(loss.detach())}; the probe needs finite "
            "losses: check that batch's data and labels (or loss scaling in fp16)"
        )
    if not bool(ok.all()):
        bad = [n for i, f in zip(order, ok[1:].tolist()) if not f for n in owners[i]]
        raise ValueError(
            f"the gradient of module {bad[0]!r} in batch {step} contains NaN or Inf"
            + (f" (also {', '.join(bad[1:4])})" if len(bad) > 1 else "")
            + "; in fp16 use bf16 or fp32 for the probe, or check the data"
        )


__all__ = ["probe"]
