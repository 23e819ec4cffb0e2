"""Put a plan's adapters into a model, and take them out again (apply / merge / unmerge).

``apply`` wraps every target linear in an ``AdaptedLinear`` (base layer kept, untouched), creates
each factor once — a shared group's factor is one tensor handed to every member — freezes every
other parameter and records the plan on the model (``model.entrolora_plan``) so that ``save`` and
``export_peft`` can find it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..plans import AdaptationPlan, ModulePlan, lori_kept
from ..targets import get_module
from .base import AdaptedLinear, kaiming_uniform
from .gradient_init import gradient_factors
from .lowrank import BlockDiagonalAdapter, LowRankAdapter
from .variants import DoRAAdapter, LoRIAdapter, VeRAAdapter, calibrate_lori_masks

PLAN_ATTR = "entrolora_plan"
MERGED_ATTR = "entrolora_merged"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside any nesting of wrappers: DDP, DataParallel, FSDP1 and DeepSpeed's
    engine (``.module``) and ``torch.compile`` (``._orig_mod``). FSDP2's ``fully_shard`` and
    accelerate's ``prepare`` of a single process wrap nothing; the model comes back as given."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or (
            type(model).__name__ in _MODULE_WRAPPERS
            and isinstance(getattr(model, "module", None), nn.Module)
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


# matched by class name so that neither FSDP nor DeepSpeed has to be imported to recognise them
_MODULE_WRAPPERS = ("FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine")


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    """``{target name: AdaptedLinear}`` in model order; names are the model's original names."""
    model = unwrap(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def get_plan(model: nn.Module) -> AdaptationPlan:
    """The plan ``apply`` built ``model`` from; ValueError when the model has no adapters."""
    plan = getattr(unwrap(model), PLAN_ATTR, None)
    if plan is None:
        raise ValueError(
            "the model has no entrolora adapters (no plan recorded); build it with "
            "el.apply(model, plan) or el.load(base_model, dir)"
        )
    return plan


ADAPTER_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_adapter_dtype(
    adapter_dtype: torch.dtype | str | None, base_dtype: torch.dtype
) -> torch.dtype:
    """The adapters' dtype: ``adapter_dtype`` (a dtype or a name of ``ADAPTER_DTYPES``), or by
    default float32, or the base dtype when that is wider (float64). ValueError otherwise."""
    if adapter_dtype is None:
        wide = base_dtype.is_floating_point and torch.finfo(base_dtype).bits > 32
        return base_dtype if wide else torch.float32
    if isinstance(adapter_dtype, str):
        if adapter_dtype not in ADAPTER_DTYPES:
            choices = ", ".join(ADAPTER_DTYPES)
            raise ValueError(f"unknown adapter dtype {adapter_dtype!r}; choose one of {choices}")
        return ADAPTER_DTYPES[adapter_dtype]
    if adapter_dtype not in ADAPTER_DTYPES.values():
        raise ValueError(
            f"adapter dtype must be a floating dtype ({', '.join(ADAPTER_DTYPES)}), got "
            f"{adapter_dtype}"
        )
    return adapter_dtype


def apply(
    model: nn.Module,
    plan: AdaptationPlan,
    *,
    dropout: float = 0.0,
    seed: int = 0,
    adapter_dtype: torch.dtype | str | None = None,
    stats: Any = None,
    for_loading: bool = False,
) -> nn.Module:
    """Inject ``plan``'s adapters into ``model`` in place and return it.

    Validates the plan against the model first (``AdaptationPlan.validate``); refuses a model that
    already has adapters. Factors are drawn from ``torch.Generator().manual_seed(seed)`` on the
    CPU (the global RNG is untouched), so every process builds identical adapters. Init follows
    METHODS.md §4: A Kaiming-uniform as peft's LoRA, B zero (shared B too); VeRA's frozen
    matrices as VeRA/peft draw them. Adapters are float32 by default whatever the base dtype
    (as peft; a float64 base keeps float64): a bf16 factor would round away every update smaller
    than ~1/256 of its value. ``adapter_dtype`` (a dtype or its name: "float32", "bfloat16",
    "float16", "float64") chooses another; the forward casts activations to the adapter dtype
    and its output back. Device follows the base layer.

    E²LoRI's masks come from ``stats`` (``GradientStats`` holding the probe's gradients, as
    ``el.probe`` returns them): B's calibration magnitudes ``|G·Aᵀ|``; ``plan.options["mask"] =
    "random"`` draws them instead. ``plan.options["init"] = "gradient"`` (the auto planner's
    option, METHODS.md §7) takes each A from the same ``stats``: the top right singular
    directions of the signal gradient (``adapters/gradient_init.py``). ``for_loading``
    (``el.load``) leaves masks and A as drawn for the saved ones to be copied in.
    """
    from ..guards.api import need_model
    from ..plans import need_plan
    from .memory import check_adapter_memory

    need_model(model, "el.apply")
    need_plan(plan, "el.apply")
    target = unwrap(model)
    if getattr(target, PLAN_ATTR, None) is not None or adapted_modules(target):
        raise ValueError(
            "the model already has entrolora adapters; apply a plan to a fresh base model, or "
            "call el.merge(model) first to fold the current adapters in"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    plan.validate(target)
    _check_groups(plan)
    first = get_module(target, next(iter(plan.modules)))  # before anything is allocated
    check_adapter_memory(
        plan, first.weight.device, resolve_adapter_dtype(adapter_dtype, first.weight.dtype)
    )
    gradients = None if for_loading else _lori_gradients(plan, stats)
    devices = {n: get_module(target, n).weight.device for n in plan.modules}
    inits = None if for_loading else gradient_factors(plan, stats, devices)

    generator = torch.Generator().manual_seed(int(seed))
    cache: dict[tuple[str, str], torch.Tensor] = {}
    order = sorted(plan.modules.items(), key=lambda kv: (kv[1].module_type, kv[1].layer, kv[0]))
    wrappers: dict[str, AdaptedLinear] = {}
    for name, m in order:
        base = get_module(target, name)
        dtype = resolve_adapter_dtype(adapter_dtype, base.weight.dtype)
        factory = _Factory(plan, m, cache, generator, dtype, base.weight.device)
        init_a = None if inits is None else inits[name]
        wrappers[name] = AdaptedLinear(base, factory.adapter(base, name, init_a), dropout)
    if gradients is not None:
        lori = {n: w.adapter for n, w in wrappers.items() if isinstance(w.adapter, LoRIAdapter)}
        calibrate_lori_masks(lori, gradients, lambda n, numel: _lori_kept(plan, n, numel))

    _install(target, wrappers)
    setattr(target, PLAN_ATTR, plan)
    return model


def _install(target: nn.Module, wrappers: dict[str, AdaptedLinear]) -> None:
    """Freeze every parameter, put each wrapper in its module's place, adapters trainable."""
    for p in target.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrappers.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, leaf, wrapper)
        for p in wrapper.adapter.parameters():
            p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Each trainable adapter parameter once (a shared factor is yielded once)."""
    seen: set[int] = set()
    for wrapper in adapted_modules(model).values():
        for p in wrapper.adapter.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def num_trainable_params(model: nn.Module) -> int:
    """Trainable adapter entries, as ``AdaptationPlan.num_trainable_params`` counts them.

    Shared tensors count once; a LoRI B counts its mask-kept entries; a FlexLoRA adapter counts
    its active directions only.
    """
    total = 0
    seen: set[int] = set()
    for wrapper in adapted_modules(model).values():
        a = wrapper.adapter
        if getattr(a, "kind", None) == "flex":
            r = int(a.mask.sum())
            total += r * (a.d_in + a.d_out + 1)
            continue
        for pname, p in a.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(a, LoRIAdapter) and pname == "B":
                total += int(a.mask.sum())
            else:
                total += p.numel()
    return total


def merge(model: nn.Module, keep_wrappers: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (``W += ΔW``, Conv1D transposed); returns the model.

    ``keep_wrappers=False`` (default) replaces each wrapper by its base layer and forgets the
    plan: the result is a plain model (base weights stay frozen). ``keep_wrappers=True`` keeps the
    wrappers in the merged state so ``unmerge`` can restore the adapters. Merging twice changes
    nothing (a merged wrapper or an already merged plain model is left as it is).
    """
    target = unwrap(model)
    wrappers = adapted_modules(target)
    if not wrappers:
        if getattr(target, MERGED_ATTR, False):
            return model
        raise ValueError("the model has no entrolora adapters to merge; el.apply a plan first")
    for wrapper in wrappers.values():
        wrapper.merge()
    if not keep_wrappers:
        for name, wrapper in wrappers.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            setattr(parent, leaf, wrapper.base_layer)
        if hasattr(target, PLAN_ATTR):
            delattr(target, PLAN_ATTR)
        setattr(target, MERGED_ATTR, True)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights (after ``merge(keep_wrappers=True)``)."""
    wrappers = adapted_modules(model)
    if not wrappers:
        raise ValueError(
            "the model has no adapter wrappers to unmerge; merge(model) removed them — use "
            "merge(model, keep_wrappers=True) to be able to unmerge"
        )
    for wrapper in wrappers.values():
        wrapper.unmerge()
    return model


def remove_adapters(model: nn.Module, requires_grad: dict[str, bool] | None = None) -> nn.Module:
    """Undo ``apply`` without merging: restore the base layers (and grad flags, when given)."""
    target = unwrap(model)
    for name, wrapper in adapted_modules(target).items():
        parent_name, _, leaf = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, leaf, wrapper.base_layer)
    if hasattr(target, PLAN_ATTR):
        delattr(target, PLAN_ATTR)
    if requires_grad is not None:
        for n, p in target.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
    return model


# -- building the factors --------------------------------------------------------------------------
def _check_groups(plan: AdaptationPlan) -> None:
    """Members sharing a factor must agree on everything that fixes its stored shape."""
    for gid, g in plan.groups.items():
        members = [plan.modules[n] for n in g.members if n in plan.modules]
        first = members[0] if members else None
        for m in members[1:]:
            for factor in g.factors:
                if factor not in m.shared:
                    continue
                same_in = m.d_in == first.d_in
                same_out = m.d_out == first.d_out
                needs = {"A": same_in, "B": same_out, "b": same_out, "d": True}.get(factor, True)
                if not needs or m.kind != first.kind or m.blocks != first.blocks:
                    raise ValueError(
                        f"group {gid!r} shares {factor} between modules of different kind, "
                        f"blocks or shape ({first.kind}/{first.blocks}/{first.d_out}x{first.d_in} "
                        f"vs {m.kind}/{m.blocks}/{m.d_out}x{m.d_in}); fix the plan's groups"
                    )


class _Factory:
    """Creates (or fetches from the shared cache) the factors of one module, then its adapter."""

    def __init__(self, plan, m: ModulePlan, cache, generator, dtype, device) -> None:
        self.plan, self.m, self.cache, self.g = plan, m, cache, generator
        self.dtype, self.device = dtype, device

    def _rank(self, factor: str) -> int:
        gid = self.m.shared.get(factor)
        return self.plan.groups[gid].rank if gid is not None else self.m.rank

    def get(self, factor: str, make, trainable: bool, key: str | None = None) -> torch.Tensor:
        """The factor tensor: shared → created once per group (``key`` ties a mask to its B)."""
        gid = self.m.shared.get(key or factor)
        if gid is not None and (gid, factor) in self.cache:
            return self.cache[(gid, factor)]
        t = make(self._rank(key or factor))
        # a mask stays bool; every other factor takes the adapter dtype
        t = t.to(device=self.device, dtype=None if t.dtype == torch.bool else self.dtype)
        t = nn.Parameter(t) if trainable else t
        if gid is not None:
            self.cache[(gid, factor)] = t
        return t

    def adapter(self, base: nn.Module, name: str, init_a: torch.Tensor | None = None) -> nn.Module:
        """The module's adapter; ``init_a``: its A instead of a Kaiming draw (init='gradient')."""
        m, g = self.m, self.g
        scale = self.plan.lora_alpha / m.rank  # METHODS.md §3: α / r with the adapter's own rank
        shared = dict(m.shared)
        d_in, d_out, n = m.d_in, m.d_out, m.blocks
        if m.kind == "flex":
            from .flex import FlexAdapter

            return FlexAdapter(
                d_in=d_in, d_out=d_out, rank=m.rank, capacity=m.capacity,
                lora_alpha=self.plan.lora_alpha, dtype=self.dtype, device=self.device, generator=g,
                init=self.plan.options.get("init", "lora"),  # METHODS.md §5; "paper" on request
            )  # fmt: skip
        if m.kind == "lora" and n > 1:
            A = self.get("A", lambda r: kaiming_uniform((n, r, d_in // n), d_in // n, g), True)
            B = self.get("B", lambda r: torch.zeros(n, d_out // n, r), True)
            return BlockDiagonalAdapter(A, B, m.rank, scale, shared)
        if n > 1:
            raise ValueError(
                f"module {name!r}: blocks={n} is only supported for kind 'lora', not {m.kind!r}"
            )
        if m.kind in ("lora", "dora"):
            draw = lambda r: kaiming_uniform((r, d_in), d_in, g)  # noqa: E731
            A = self.get("A", draw if init_a is None else lambda r: init_a, True)
            B = self.get("B", lambda r: torch.zeros(d_out, r), True)
            if m.kind == "lora":
                return LowRankAdapter(A, B, m.rank, scale, shared)
            return DoRAAdapter(A, B, m.rank, scale, base, shared)
        if m.kind == "vera":
            # VeRA and peft: Kaiming-uniform with gain √2, U(±√(6/fan_in)); d = 0.1, b = 0;
            # no α/r factor (VeRA eq. 2)
            A = self.get("A", lambda r: kaiming_uniform((r, d_in), d_in, g, a=0.0), False)
            B = self.get("B", lambda r: kaiming_uniform((d_out, r), r, g, a=0.0), False)
            d = self.get("d", lambda r: torch.full((r,), 0.1), True)
            b = self.get("b", lambda r: torch.zeros(d_out), True)
            return VeRAAdapter(A, B, d, b, m.rank, 1.0, shared)
        # lori: the mask keeps exactly lori_kept entries: B's calibration magnitudes, set by
        # apply once every adapter exists (a shared B sums its layers), or seeded random
        sparsity = m.sparsity or 0.0
        A = self.get("A", lambda r: kaiming_uniform((r, d_in), d_in, g), False)
        B = self.get("B", lambda r: torch.zeros(d_out, r), True)
        if _lori_mask_mode(self.plan) == "random":
            make = lambda r: _random_mask(d_out, r, sparsity, g)  # noqa: E731
        else:
            make = lambda r: torch.zeros(d_out, r, dtype=torch.bool)  # noqa: E731
        mask = self.get("mask", make, False, key="B")
        if "B" in shared:
            shared["mask"] = shared["B"]
        return LoRIAdapter(A, B, mask, m.rank, scale, shared)


LORI_MASKS = ("magnitude", "random")


def _lori_mask_mode(plan: AdaptationPlan) -> str:
    mode = plan.options.get("mask", "magnitude")
    if mode not in LORI_MASKS:
        raise ValueError(f"plan option mask must be one of {', '.join(LORI_MASKS)}, got {mode!r}")
    return mode


def _lori_kept(plan: AdaptationPlan, name: str, numel: int) -> int:
    return lori_kept(numel, plan.modules[name].sparsity or 0.0)


def _lori_gradients(plan: AdaptationPlan, stats: Any) -> dict[str, torch.Tensor] | None:
    """The probe's gradients of the LoRI modules when their masks are calibrated, else None;
    ValueError (before the model is touched) when they are needed and missing."""
    names = [n for n, m in plan.modules.items() if m.kind == "lori"]
    if not names or _lori_mask_mode(plan) == "random":
        return None
    grads = getattr(stats, "gradients", None) or {}
    missing = [n for n in names if n not in grads]
    if missing:
        raise ValueError(
            f"E²LoRI masks B by calibration magnitudes |G·Aᵀ| and needs the probed gradient of "
            f"{missing[0]!r}: pass el.apply(model, plan, stats=el.probe(...)) (statistics that "
            "keep their gradients), or set plan.options['mask'] = 'random'"
        )
    return {n: grads[n] for n in names}


def _random_mask(d_out: int, r: int, sparsity: float, g: torch.Generator) -> torch.Tensor:
    """A bool ``(d_out, r)`` mask keeping exactly ``lori_kept(d_out·r, sparsity)`` entries."""
    numel = d_out * r
    keep = torch.randperm(numel, generator=g)[: lori_kept(numel, sparsity)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(d_out, r)
