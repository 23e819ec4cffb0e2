"""AdaptationPlan: for every target module its rank, shared group, block count and adapter kind.

A plan is plain data (frozen dataclasses, JSON on disk). Adapter kinds and their factors:

- ``lora``:  A ``(r, d_in)``, B ``(d_out, r)``; with ``blocks = n > 1`` they are block-diagonal
  (MELoRA): n blocks ``A_i (r, d_in/n)``, ``B_i (d_out/n, r)`` — same parameter count.
- ``dora``:  A, B as ``lora`` plus a per-module magnitude ``m (d_out)``, never shared.
- ``vera``:  frozen A ``(R, d_in)`` and B ``(d_out, R)``; trainable ``d (r)`` and ``b (d_out)``.
- ``lori``:  frozen A ``(r, d_in)``; trainable B ``(d_out, r)`` under a fixed sparsity mask that
  keeps ``lori_kept(d_out * r, sparsity)`` entries.
- ``flex``:  P ``(d_out, c)``, λ ``(c)``, Q ``(c, d_in)`` with capacity c, r directions active.

``ModulePlan.shared`` maps a factor name (``"A"``, ``"B"``, ``"d"``, ``"b"``) to a group id; the
group's tensor is one parameter of rank ``GroupPlan.rank`` referenced by every member, and a
member of rank ``r < GroupPlan.rank`` uses its first r rows of A / columns of B (the
E²ShareLoRA slice). ``ModulePlan.group`` is the module's sharing interval (or type-wide group for
ShareLoRA), null when nothing is shared.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..data.reading import read_json
from ..files import atomic_write_text
from ..guards.api import got
from ..targets import get_module, is_all_linear, is_linear, linear_dims, split_module_name

FORMAT = "entrolora.plan"
FORMAT_VERSION = 1
KINDS = ("lora", "dora", "vera", "lori", "flex")
SHAREABLE_FACTORS = ("A", "B", "d", "b")
FROZEN_FACTORS = {"vera": ("A", "B"), "lori": ("A",)}


#: FlexLoRA's initial factors (adapters/flex.py): plain LoRA's, or the paper's.
FLEX_INITS = ("lora", "paper")


def lori_kept(numel: int, sparsity: float) -> int:
    """Entries of a LoRI B matrix left trainable by a mask of the given sparsity."""
    return numel - int(round(sparsity * numel))


@dataclass(frozen=True)
class ModulePlan:
    """The adapter of one target module (see the module docstring for kinds and factors)."""

    rank: int
    d_in: int
    d_out: int
    module_type: str
    layer: int
    kind: str = "lora"
    group: str | None = None
    blocks: int = 1
    shared: dict[str, str] = field(default_factory=dict)
    capacity: int | None = None  # flex only
    sparsity: float | None = None  # lori only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; known: {', '.join(KINDS)}")
        for name in ("rank", "d_in", "d_out", "layer", "blocks"):
            value = getattr(self, name)
            if type(value) is int:  # the common case, without the slow ABC check below
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"ModulePlan.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints → int, so JSON stays plain
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if min(self.d_in, self.d_out) < 1 or self.layer < 0:
            raise ValueError(
                f"d_in, d_out must be ≥ 1 and layer ≥ 0; got {self.d_in}, {self.d_out}, "
                f"{self.layer}"
            )
        if not isinstance(self.shared, Mapping):
            raise ValueError(f"ModulePlan.shared must map factor → group id, got {self.shared!r}")
        object.__setattr__(self, "shared", dict(self.shared))
        bad = sorted(set(self.shared) - set(SHAREABLE_FACTORS))
        if bad:
            raise ValueError(
                f"factor(s) {bad} cannot be shared; shareable: {', '.join(SHAREABLE_FACTORS)}"
            )
        n = self.blocks
        if n < 1 or n & (n - 1) or self.d_in % n or self.d_out % n:
            raise ValueError(
                f"blocks={n} must be a power of two dividing d_in={self.d_in} and "
                f"d_out={self.d_out}"
            )
        if self.kind == "flex":
            cap = self.capacity
            if isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or cap < self.rank:
                raise ValueError(f"a flex module needs capacity ≥ rank (an integer); got {cap!r}")
        if self.sparsity is not None and not (
            isinstance(self.sparsity, numbers.Real) and 0.0 <= self.sparsity < 1.0
        ):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")

    def check_ranges(self) -> None:
        """ValueError for a size no planner writes, run when a plan meets a model
        (``AdaptationPlan.validate``): a rank or a FlexLoRA capacity above ``min(d_in, d_out)``,
        directions the layer's update cannot have, allocated all the same. The adapters' total
        size is checked against the model (``validate``) and the memory
        (``adapters/memory.py``)."""
        top = min(self.d_in, self.d_out)
        if self.rank > top:
            raise ValueError(
                f"field 'rank' is {self.rank:,} on a {self.d_in}×{self.d_out} layer, whose "
                f"update has at most min(d_in, d_out) = {top} directions; allowed: 1..{top}"
            )
        if self.kind == "flex" and self.capacity > top:
            raise ValueError(
                f"field 'capacity' is {self.capacity}, above min(d_in, d_out) = {top} of this "
                f"{self.d_in}×{self.d_out} layer; allowed: {self.rank}..{top}"
            )


@dataclass(frozen=True)
class GroupPlan:
    """A shared group: its members (ordered by layer), the factors they share and their rank."""

    members: tuple[str, ...]
    factors: tuple[str, ...]
    rank: int
    module_type: str

    def __post_init__(self) -> None:
        # lists (from JSON or callers) become tuples so that equality survives a round trip
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "factors", tuple(self.factors))
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
            raise ValueError(f"GroupPlan.rank must be an integer, got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if self.rank < 1:
            raise ValueError(f"a group's rank must be ≥ 1, got {self.rank}")
        bad = sorted(set(self.factors) - set(SHAREABLE_FACTORS))
        if bad:
            raise ValueError(
                f"factor(s) {bad} cannot be shared; shareable: {', '.join(SHAREABLE_FACTORS)}"
            )


@dataclass(frozen=True)
class AdaptationPlan:
    """Where LoRA capacity goes: one ``ModulePlan`` per target module, plus shared groups."""

    method: str
    modules: dict[str, ModulePlan]
    groups: dict[str, GroupPlan] = field(default_factory=dict)
    lora_alpha: float = 16.0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("a plan needs at least one module")
        alpha = self.lora_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not (math.isfinite(alpha) and alpha > 0)
        ):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {alpha!r}")
        for gid, g in self.groups.items():
            absent = [n for n in g.members if n not in self.modules]
            if absent:
                raise ValueError(f"group {gid!r} lists {absent[0]!r}, which is not a plan module")
        for name, m in self.modules.items():
            for factor, gid in m.shared.items():
                g = self.groups.get(gid)
                if g is None:
                    raise ValueError(f"module {name!r} shares {factor} with unknown group {gid!r}")
                if name not in g.members or factor not in g.factors:
                    raise ValueError(
                        f"group {gid!r} does not list module {name!r} / factor {factor}"
                    )
                if factor in ("A", "B", "d") and m.rank > g.rank:
                    raise ValueError(
                        f"module {name!r} has rank {m.rank} above its group's {g.rank}"
                    )
            if m.group is not None and m.group not in self.groups:
                raise ValueError(f"module {name!r} names unknown group {m.group!r}")

    # -- counting -----------------------------------------------------------------------------
    def num_trainable_params(self) -> int:
        """Trainable parameters, each shared tensor counted once (flex: active directions)."""
        total = 0
        seen: set[tuple[str, str]] = set()
        for m in self.modules.values():
            for factor, numel in _trainable_factors(m).items():
                gid = m.shared.get(factor)
                if gid is None:
                    total += numel
                elif (gid, factor) not in seen:
                    seen.add((gid, factor))
                    total += _group_numel(self.groups[gid], factor, m)
        return total

    @property
    def max_rank(self) -> int:
        """Largest per-module exported rank (block-diagonal: blocks·rank)."""
        return max(m.rank * m.blocks for m in self.modules.values())

    # -- checks -------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Check the plan against ``model`` in both directions; ValueError naming the mismatch.

        Every planned module must exist, be linear and have the planned ``d_in × d_out``; and
        every module the plan targets must be planned — the modules its recorded
        ``options["target_modules"]`` select in ``model``, or, when it records none, every
        linear module of each planned module type. A plan for a 2-layer model thus fails on a
        3-layer model of the same width instead of leaving the third layer bare.
        """
        for name, m in self.modules.items():
            found = get_module(model, name)
            module = _linear_of(found)
            if module is None:
                raise ValueError(
                    f"plan module {name!r} is a {type(found).__name__} in this model, not a "
                    "linear layer; the plan was made for another model"
                )
            d_in, d_out = linear_dims(module)
            if (d_in, d_out) != (m.d_in, m.d_out):
                raise ValueError(
                    f"plan module {name!r} expects d_in×d_out {m.d_in}×{m.d_out} but the model has "
                    f"{d_in}×{d_out}; the plan was made for another model"
                )
            try:
                m.check_ranges()
            except ValueError as e:
                raise ValueError(f"plan module {name!r}: {e}") from None
        own = sum(p.numel() for p in model.parameters())
        trained = self.num_trainable_params()
        if trained > own:
            raise ValueError(
                f"the plan trains {trained:,} parameters, more than the model's own {own:,}: "
                "an adapter larger than its model is no low-rank adaptation; allowed: at most "
                f"{own:,} (lower the ranks, or make the plan again)"
            )
        targeted = self.targeted(model)
        bare = [n for n in targeted if n not in self.modules]
        if bare:
            mtype = targeted[bare[0]][0]
            planned = [m.layer for m in self.modules.values() if m.module_type == mtype]
            present = [layer for t, layer in targeted.values() if t == mtype]
            raise ValueError(
                f"the plan leaves {len(bare)} module(s) of this model bare, e.g. {bare[0]!r}: it "
                f"adapts layer(s) {_layers(planned)} of {mtype!r}, the model has "
                f"{_layers(present)}; the plan was made for another model — make it again on "
                "this one (a plan meant for some layers only lists them in "
                "options.target_modules)"
            )

    def targeted(self, model: nn.Module) -> dict[str, tuple[str, int]]:
        """``{name: (module type, layer)}`` of the modules of ``model`` this plan should cover.

        Those its recorded ``options["target_modules"]`` select (suffixes or full names, one
        regular expression or ``"all-linear"``, as ``find_targets``), else every linear module
        of a planned type.
        """
        linear = _layer_linears(model)
        patterns = self.options.get("target_modules") if isinstance(self.options, Mapping) else None
        if is_all_linear(patterns):
            return linear
        if isinstance(patterns, str):
            try:
                regex = re.compile(patterns)
            except re.error:
                patterns = None
            else:
                return {n: v for n, v in linear.items() if regex.fullmatch(n)}
        if isinstance(patterns, (list, tuple)) and patterns:
            return {
                n: v
                for n, v in linear.items()
                if any(isinstance(p, str) and (n == p or n.endswith("." + p)) for p in patterns)
            }
        types = {m.module_type for m in self.modules.values()}
        return {n: v for n, v in linear.items() if v[0] in types}

    # -- presentation -------------------------------------------------------------------------
    def summary(self) -> str:
        """A plain-text table: a row per module type, a column per layer, rank/blocks/group; the
        budget an ``auto`` plan spent and the decisions E²LoRA's gate left undecided."""
        from .summary import summary_text

        return summary_text(self)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able data, with the format name and version."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "lora_alpha": self.lora_alpha,
            "options": self.options,
            "modules": {n: asdict(m) for n, m in self.modules.items()},
            "groups": {g: asdict(v) for g, v in self.groups.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> AdaptationPlan:
        """The plan ``to_dict`` wrote; ValueError naming what is wrong with a foreign dict."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan is a JSON object, got {type(d).__name__}")
        if d.get("format", FORMAT) != FORMAT:
            raise ValueError("not an entrolora plan (its 'format' field differs)")
        if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"plan format version {d.get('format_version')} is not {FORMAT_VERSION}; "
                "make the plan again with this entrolora version"
            )
        missing = {"method", "modules"} - set(d)
        if missing:
            raise ValueError(f"plan is missing the field(s) {sorted(missing)}")
        try:
            modules = {}
            for n, m in d["modules"].items():
                try:
                    modules[n] = ModulePlan(**m)
                except ValueError as e:
                    raise ValueError(f"plan module {n!r}: {e}") from None
            groups = {
                g: GroupPlan(
                    members=tuple(v["members"]),
                    factors=tuple(v["factors"]),
                    rank=v["rank"],
                    module_type=v["module_type"],
                )
                for g, v in d.get("groups", {}).items()
            }
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"plan has a malformed module or group entry: {e}") from None
        return cls(
            method=d["method"],
            modules=modules,
            groups=groups,
            lora_alpha=float(d.get("lora_alpha", 16.0)),
            options=dict(d.get("options", {})),
        )

    def to_json(self) -> str:
        """``to_dict`` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically; returns the path (refused inside a published
        entrolora output: ``guards.output.guard_file``)."""
        from ..guards.output import guard_file

        text = self.to_json() + "\n"
        return atomic_write_text(guard_file(path, "AdaptationPlan.save", len(text)), text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdaptationPlan:
        """Read a plan written by ``save``; ValueError on a missing or malformed file."""
        d = read_json(path, "plan file", "run `entrolora plan` to make one", kind=object)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"plan file {str(path)!r}: {e}") from None


def _trainable_factors(m: ModulePlan) -> dict[str, int]:
    """Trainable element count of each factor of one module at its own rank."""
    r, d_in, d_out = m.rank, m.d_in, m.d_out
    if m.kind == "lora":
        return {"A": r * d_in, "B": d_out * r}
    if m.kind == "dora":
        return {"A": r * d_in, "B": d_out * r, "m": d_out}
    if m.kind == "vera":
        return {"d": r, "b": d_out}
    if m.kind == "lori":
        return {"B": lori_kept(d_out * r, m.sparsity or 0.0)}
    return {"P": d_out * r, "lambda": r, "Q": r * d_in}  # flex: active directions


def _group_numel(g: GroupPlan, factor: str, m: ModulePlan) -> int:
    """Element count of a shared factor stored at the group's rank."""
    r = g.rank
    if factor == "A":
        return r * m.d_in
    if factor == "B":
        if m.kind == "lori":
            return lori_kept(m.d_out * r, m.sparsity or 0.0)
        return m.d_out * r
    if factor == "d":
        return r
    if factor == "b":
        return m.d_out
    raise ValueError(f"factor {factor!r} cannot be shared")


def _linear_of(module: nn.Module) -> nn.Module | None:
    """The linear layer itself, or the frozen one an adapted wrapper holds; None otherwise."""
    if is_linear(module):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and is_linear(base) else None


def _layer_linears(model: nn.Module) -> dict[str, tuple[str, int]]:
    """``{name: (module type, layer)}`` of every linear module inside a layer stack."""
    out = {}
    for name, module in model.named_modules():
        if not name or name.endswith(".base_layer") or _linear_of(module) is None:
            continue
        try:
            out[name] = split_module_name(name)
        except ValueError:
            continue  # not in a layer stack (lm_head, pooler): never a target
    return out


def _layers(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for x in sorted(set(layers)):
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def need_plan(value: Any, call: str, arg: str = "plan") -> None:
    """TypeError unless ``value`` is an ``AdaptationPlan``."""
    if isinstance(value, AdaptationPlan):
        return
    hint = ""
    if isinstance(value, (str, os.PathLike)):
        hint = f"; read the file first: el.AdaptationPlan.load({os.fspath(value)!r})"
    elif isinstance(value, dict):
        hint = "; build it with el.AdaptationPlan.from_dict(...)"
    raise TypeError(f"{call}: {arg} must be an AdaptationPlan, got {got(value)}{hint}")
