"""Small helpers for runs under ``torch.distributed`` (torchrun, accelerate, DeepSpeed).

entrolora has no distributed machinery of its own: the probe all-reduces its accumulated
gradients (METHODS.md §1), planners are pure functions (identical statistics in, identical plan
out, no communication), ``apply`` initialises adapters from a seed, and training is left to
DDP/FSDP/ZeRO like any parameter. These helpers cover what a launcher script still needs:

- ``world_info()`` / ``is_main_process()``: who am I, without caring whether the process group
  is initialised yet (torchrun and accelerate export ``RANK``/``WORLD_SIZE`` before that);
- ``broadcast_plan(plan, src=0)``: the "plan on one rank, send to all" option, as our own JSON
  bytes in a uint8 tensor (nothing is unpickled);
- ``check_same_plan(plan)`` / ``check_same_parameters(model)``: cheap digests compared across
  ranks, to fail loudly if ranks diverged (different statistics, different seeds) rather than
  train silently different adapters.

Every function works, and communicates nothing, in a single process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .plans import AdaptationPlan

T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job. ``initialized``: a default process group exists."""

    rank: int
    world_size: int
    local_rank: int
    initialized: bool
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process and they can talk (a group exists)."""
        return self.initialized and self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; unset it or launch "
            "with torchrun/accelerate, which set it correctly"
        ) from None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> WorldInfo:
    """Rank, world size and local rank: from the process group if one exists, else from the
    launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if _initialized():
        return WorldInfo(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            initialized=True,
            backend=str(dist.get_backend()),
        )
    return WorldInfo(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=local_rank,
        initialized=False,
        backend=None,
    )


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the one that writes files and logs."""
    return world_info().rank == 0


def _device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_bytes(data: bytes | None, src: int) -> bytes:
    device = _device()
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(length, src=src)
    if dist.get_rank() == src and data:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    if buf.numel():
        dist.broadcast(buf, src=src)
    return bytes(buf.cpu().numpy().tobytes())


def broadcast_plan(plan: AdaptationPlan | None, src: int = 0) -> AdaptationPlan:
    """The plan of rank ``src``, on every rank (other ranks may pass None).

    For the "plan on rank 0, broadcast" option (issue 8 item 2): the plan travels as its own JSON
    (``AdaptationPlan.to_json``), so what arrives is exactly what ``plan.save`` would write. In a
    single process (or before the process group exists) the plan is returned unchanged.
    """
    info = world_info()
    if not info.distributed:
        if plan is None:
            raise ValueError(
                "broadcast_plan got plan=None outside a distributed run; pass the plan (only "
                "non-source ranks of an initialised process group may pass None)"
            )
        return plan
    if not 0 <= src < info.world_size:
        raise ValueError(f"src={src} is not a rank of this job (world size {info.world_size})")
    if info.rank == src and not isinstance(plan, AdaptationPlan):
        # Tell the peers before raising, so they fail too instead of waiting forever.
        _broadcast_bytes(b"", src)
        raise TypeError(f"broadcast_plan on the source rank needs an AdaptationPlan, got {plan!r}")
    data = plan.to_json().encode("utf-8") if info.rank == src else None
    received = _broadcast_bytes(data, src)
    if not received:
        raise ValueError(
            f"rank {src} had no plan to broadcast (it passed None or a non-plan); pass the "
            f"AdaptationPlan on rank {src}"
        )
    if info.rank == src:
        return plan
    return AdaptationPlan.from_dict(json.loads(received.decode("utf-8")))


def _gather_digests(digest: bytes) -> list[bytes]:
    device = _device()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [bytes(t.cpu().numpy().tobytes()) for t in everyone]


def plan_digest(plan: AdaptationPlan) -> str:
    """SHA-256 of the plan's canonical JSON (sorted keys): equal digests, equal plans."""
    text = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ranks_differing(digest: str) -> list[int]:
    """Ranks whose hex ``digest`` differs from this rank's (empty when not distributed)."""
    if not world_info().distributed:
        return []
    digests = _gather_digests(bytes.fromhex(digest))
    return [r for r, d in enumerate(digests) if d.hex() != digest]


def check_same_plan(plan: AdaptationPlan) -> str:
    """Raise ValueError if any rank holds a different plan; returns the plan's digest.

    Plans computed on every rank from the all-reduced statistics agree by construction; this
    catches a rank that loaded another stats file or planned with other options.
    """
    digest = plan_digest(plan)
    differ = _ranks_differing(digest)
    if differ:
        raise ValueError(
            f"ranks {differ} hold a different adaptation plan than rank {dist.get_rank()}; "
            "compute the plan from the same (probe-reduced) statistics with the same options "
            "on every rank, or make it on rank 0 and call broadcast_plan"
        )
    return digest


def parameters_digest(model: nn.Module, trainable_only: bool = True) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of the model's (trainable) parameters.

    A shared parameter is hashed once (``named_parameters`` yields it once).
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_parameters(model: nn.Module, trainable_only: bool = True) -> str:
    """Raise ValueError if the (trainable) parameters differ between ranks; returns the digest.

    Call it after ``apply`` and before wrapping in DDP/FSDP (a sharded model holds different
    shards on each rank). Different adapters mean ``apply`` got different seeds or plans.
    """
    digest = parameters_digest(model, trainable_only=trainable_only)
    differ = _ranks_differing(digest)
    if differ:
        raise ValueError(
            f"ranks {differ} hold different adapter parameters than rank {dist.get_rank()}; "
            "call entrolora.apply with the same plan and seed on every rank (or broadcast "
            "the parameters from rank 0 before training)"
        )
    return digest


def shared_parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """Parameters registered under more than one name: ``{first name: [every name]}``.

    entrolora's shared factors (METHODS.md §3: one A/B per interval or per module type) are one
    ``nn.Parameter`` registered in every member layer; DDP reduces such a parameter once per
    step, but FSDP needs all its owners inside one FSDP unit.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {all_names[0]: all_names for all_names in names.values() if len(all_names) > 1}


def fsdp_groups(model: nn.Module, wrap: Callable[[nn.Module], bool]) -> list[list[nn.Module]]:
    """Per module that ``wrap`` selects, the modules that can form its FSDP unit (see
    ``fsdp_units``): ``[module]`` itself when it holds no factor shared with the outside, else its
    largest sub-modules free of shared factors. FSDP2 shards a list as one unit, so a decoder
    layer stays one all-gather: ``for g in fsdp_groups(model, wrap): fully_shard(g)``.
    """
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)

    def closed(prefix: str, module: nn.Module) -> bool:
        head = prefix + "."
        return all(all(n.startswith(head) for n in owners[id(p)]) for p in module.parameters())

    def visit(prefix: str, module: nn.Module, found: list[nn.Module]) -> None:
        if next(module.parameters(), None) is None:
            return
        if closed(prefix, module):
            found.append(module)
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}", child, found)

    groups: list[list[nn.Module]] = []
    taken: list[str] = []  # wanted modules already handled; their descendants are covered
    for prefix, module in model.named_modules():
        if not prefix or not wrap(module) or any(prefix.startswith(t + ".") for t in taken):
            continue
        taken.append(prefix)
        found: list[nn.Module] = []
        visit(prefix, module, found)
        if found:
            groups.append(found)
    return groups


def fsdp_units(model: nn.Module, wrap: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """Modules that can be FSDP units of their own without splitting a shared parameter.

    ``wrap(module)`` says which modules you would wrap (e.g. ``lambda m: isinstance(m,
    LlamaDecoderLayer)``). A wanted module that holds no parameter shared with the outside is
    returned as is; one that does (a layer with an E²LoRA/E²ShareLoRA shared factor) is replaced
    by its largest sub-modules that hold parameters and none that is shared with the outside
    (the frozen base weights, the MLP, …). Shared factors then stay in the root unit, which
    gathers them once per step: shard the returned modules first, the root last:

        for m in fsdp_units(model, lambda m: isinstance(m, LlamaDecoderLayer)):
            fully_shard(m)
        fully_shard(model)

    With FSDP1: ``auto_wrap_policy=CustomPolicy(lambda m: m in set(units))`` and
    ``use_orig_params=True``.
    """
    return [m for group in fsdp_groups(model, wrap) for m in group]


# -- for training loops started by a launcher (entrolora train under torchrun / accelerate) ------
def init_from_launcher(device: torch.device) -> bool:
    """Create the default process group when a launcher started several processes
    (``WORLD_SIZE > 1``) and none exists yet: NCCL for a CUDA device, gloo otherwise. Returns
    True when this call created it (the caller then ends it with ``end_process_group``)."""
    info = world_info()
    if info.initialized or info.world_size <= 1:
        return False
    if not dist.is_available():
        raise ValueError(
            f"WORLD_SIZE={info.world_size} but this torch build has no torch.distributed; "
            "run a single process or install a torch build with distributed support"
        )
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def end_process_group(created: bool) -> None:
    """Destroy the default process group if ``init_from_launcher`` created it."""
    if created and _initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This process's device: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world_info().local_rank)
        torch.cuda.set_device(device)
    return device


def shard(items: Iterable[T], per_rank: int | None = None) -> Iterator[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at its rank, at most
    ``per_rank`` of them (give ``len(items) // world_size`` so that every rank takes the same
    number of steps; DDP needs that). The whole iterable in a single process."""
    info = world_info()
    if not info.distributed:
        yield from itertools.islice(items, per_rank)
        return
    mine = itertools.islice(items, info.rank, None, info.world_size)
    yield from itertools.islice(mine, per_rank)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DDP (``find_unused_parameters=False``) when distributed, else unchanged."""
    if not world_info().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if world_info().distributed:
        dist.barrier()
