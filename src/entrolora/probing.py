"""The gradient probe: accumulated full-weight gradients of the target modules (METHODS.md §1).

    G = (1/S) · Σ_s ∂loss(b_s)/∂W        accumulated in float32 whatever the model dtype

One pass of ``S`` forward+backward steps, nothing stepped. Only the target weights require grad.
Each target gradient is folded into its float32 accumulator by a post-accumulate-grad hook the
moment autograd has produced it, and ``p.grad`` is dropped right there, so at most one target
gradient is alive beyond the accumulators (the plain training step holds all of them at the end
of its backward). The hook fires after the last contribution to the weight's gradient in every
backward, the last batch's included, and exactly once per backward with gradient checkpointing.

Under ``torch.distributed`` each process passes its own batches; the sums and the batch counts
are all-reduced once at the end, so every process returns the statistics of the mean gradient
over the union of all processes' batches.

The model's mode is left as the caller set it (eval is what you want: no dropout noise in the
measurement; HF models load in eval mode). Gradient checkpointing only acts in train mode in
transformers, so a checkpointed probe is a probe in train mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .stats import GradientStats
from .targets import find_targets

LossFn = Callable[[nn.Module, Any], torch.Tensor]
OFFLOADS = (None, "cpu")


# -- accumulators ----------------------------------------------------------------------------
class _DeviceSums:
    """float32 sums on each weight's own device (``offload=None``, or any CPU model)."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    def add(self, i: int, g: torch.Tensor) -> None:
        self.sums[i].add_(g)  # promotes bf16/fp16 into the float32 sum, no temporary copy

    def end_step(self) -> None:
        pass

    def finish(self) -> list[torch.Tensor]:
        return self.sums

    def close(self) -> None:
        pass


class _HostSums:
    """float32 sums in pinned host memory for a CUDA model (``offload="cpu"``).

    A gradient is copied asynchronously, on a side stream, into a pinned staging buffer of its
    own dtype; ``record_stream`` keeps its device memory from being reused before the copy ends.
    After the step, one worker thread folds the staging buffers into the sums while the GPU runs
    the next step; two sets of staging buffers alternate so that the fold of step s and the copies
    of step s+1 never touch the same buffer.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, pin_memory=True) for p in params]
        self.staging = [
            [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params] for _ in range(2)
        ]
        self.streams = {p.device: torch.cuda.Stream(device=p.device) for p in params}
        self.slot = 0
        self.copied: list[list[int]] = [[], []]
        self.pending: list[Future | None] = [None, None]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrolora-probe")

    def add(self, i: int, g: torch.Tensor) -> None:
        stream = self.streams[g.device]
        stream.wait_stream(torch.cuda.current_stream(g.device))  # the gradient is complete
        with torch.cuda.stream(stream):
            self.staging[self.slot][i].copy_(g, non_blocking=True)
        g.record_stream(stream)
        self.copied[self.slot].append(i)

    def end_step(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()  # staging of this step is complete before the host reads it
        slot = self.slot
        idx, self.copied[slot] = self.copied[slot], []
        self.pending[slot] = self.pool.submit(self._fold, slot, idx)
        self.slot = slot ^ 1
        # The next step writes into the other set: its previous fold must be over.
        self._wait(self.slot)

    def _fold(self, slot: int, idx: list[int]) -> None:
        for i in idx:
            self.sums[i].add_(self.staging[slot][i])

    def _wait(self, slot: int) -> None:
        fut, self.pending[slot] = self.pending[slot], None
        if fut is not None:
            fut.result()

    def finish(self) -> list[torch.Tensor]:
        self._wait(0)
        self._wait(1)
        return self.sums

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# -- helpers ---------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The module to run: DDP's inner module (its own gradient hooks stay idle when it is
    called directly; the probe all-reduces once at the end instead)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


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


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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


def _progress(steps: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="probe", unit="step", dynamic_ncols=True)


def _dist_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(t: torch.Tensor) -> None:
    """In-place SUM over processes; NCCL needs CUDA tensors, so host tensors take a round trip."""
    import torch.distributed as dist

    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tmp)
        t.copy_(tmp)
    else:
        dist.all_reduce(t)


def _reduce_counts(count: int, failed: bool) -> tuple[int, int]:
    """``(total batches, failed processes)`` over all processes, in one collective."""
    status = torch.tensor([count, int(failed)], dtype=torch.int64)
    _all_reduce_sum(status)
    return int(status[0]), int(status[1])


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
) -> GradientStats:
    """Accumulate the target weights' gradients over ``steps`` batches; their statistics.

    ``batches``: dicts fed as ``model(**batch)`` (loss from ``.loss``), or anything ``loss_fn``
    (``loss_fn(model, batch) -> scalar``) takes; tensors are moved to the model's device.
    ``target_modules``: suffixes, full names or one regex (``find_targets``). ``offload="cpu"``
    keeps the float32 accumulators in pinned host memory (CUDA models). ``allow_fewer``: fewer
    batches than ``steps`` is accepted (else a ValueError). Returns ``GradientStats`` of
    ``G = mean of the gradients`` (METHODS.md §1–2) with sensitivities (RaLoRA eq. 5), the
    gradients kept when ``keep_gradients``. Under ``torch.distributed`` every process returns
    the statistics of the mean over all processes' batches (a DDP-wrapped model is probed
    through ``model.module``, so names carry no ``module.`` prefix; FSDP/ZeRO-3 models are
    refused: probe before wrapping). Parameters' ``requires_grad`` and ``.grad`` and modules'
    train/eval mode are restored, also on error; the mode is not changed (eval: no dropout).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (number of batches), got {steps!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    net = _unwrap(model)
    targets = find_targets(net, target_modules)
    modules = {name: net.get_submodule(name) for name in targets}
    _check_not_sharded(net, {name: m.weight for name, m in modules.items()})

    # One accumulator per distinct weight: tied targets share one parameter and one sum.
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

    all_params = list(net.parameters())
    saved_requires = [p.requires_grad for p in all_params]
    saved_grads = [p.grad for p in all_params]
    saved_modes = [(m, m.training) for m in net.modules()]
    world = _dist_world()
    device = _input_device(net)
    on_cuda = any(p.device.type == "cuda" for p in params)
    sums_kind = _HostSums if (offload == "cpu" and on_cuda) else _DeviceSums
    handles: list[Any] = []
    sums: _DeviceSums | _HostSums | None = None
    bar = None
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        sums = sums_kind(params)
        finite: dict[int, torch.Tensor] = {}

        def make_hook(i: int) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                g = p.grad
                finite[i] = torch.isfinite(g).all()  # stays on the device: no sync here
                sums.add(i, g)
                p.grad = None  # free it now: at most one target gradient alive at a time

            return hook

        handles = [p.register_post_accumulate_grad_hook(make_hook(i)) for i, p in enumerate(params)]
        bar = _progress(steps, progress)
        count, error = 0, None
        try:
            count = _run(net, batches, steps, loss_fn, device, sums, finite, owners, bar)
            if count == 0:
                raise ValueError("batches is empty; the probe needs at least one batch")
            if count < steps and not allow_fewer:
                raise ValueError(
                    f"batches ran out after {count} of steps={steps} batches; pass more batches, "
                    f"steps={count}, or allow_fewer=True"
                )
        except Exception as e:  # in a process group the peers must still learn that we failed
            error = e
        total = count
        if world > 1:
            total, failed = _reduce_counts(count, error is not None)
            if error is None and failed:
                raise ValueError(
                    f"the probe failed on {failed} other process(es) of {world}; see their error"
                )
        if error is not None:
            raise error
        accumulated = sums.finish()
        for acc in accumulated:
            if world > 1:
                _all_reduce_sum(acc)
            acc.div_(total)  # in place: no second copy of every gradient on the device
        grads: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        for name, t in targets.items():
            acc = accumulated[slot_of[name]]
            w = modules[name].weight.detach()
            # Conv1D stores (d_in, d_out): statistics and plans use the (d_out, d_in) orientation.
            grads[name] = acc.T if t.transposed else acc
            weights[name] = w.T if t.transposed else w
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
        if sums is not None:
            sums.close()
        for p, req, g in zip(all_params, saved_requires, saved_grads):
            p.requires_grad_(req)
            p.grad = g
        for m, mode in saved_modes:
            m.training = mode

    meta = {
        "model": type(net).__name__,
        "target_modules": target_modules
        if isinstance(target_modules, str)
        else list(target_modules),
        "steps": total,
        "world_size": world,
        "dtype": str(params[0].dtype).removeprefix("torch."),
    }
    stat_device = params[0].device  # statistics on the accelerator even when offloaded
    return GradientStats.from_gradients(
        grads,
        weights,
        steps=total,
        keep_gradients=keep_gradients,
        meta=meta,
        device=stat_device,
    )


def _run(
    net: nn.Module,
    batches: Iterable[Any],
    steps: int,
    loss_fn: LossFn | None,
    device: torch.device,
    sums: _DeviceSums | _HostSums,
    finite: dict[int, torch.Tensor],
    owners: Mapping[int, list[str]],
    bar: Any,
) -> int:
    """Forward+backward over up to ``steps`` batches; returns how many were seen."""
    count = 0
    iterator = iter(batches)
    with torch.enable_grad():
        for step in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            finite.clear()
            loss = _loss_of(net, _to_device(batch, device), loss_fn, step)
            loss.backward()
            sums.end_step()
            # One host sync per step, as a training loop's loss.item(): loss and gradients checked.
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
            count += 1
            if bar is not None:
                bar.update(1)  # tqdm shows the rate in step/s
    return count


__all__ = ["probe"]
