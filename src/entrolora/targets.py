"""Target-module discovery: which linear layers get adapters, their module type and layer index.

A *module type* is the qualified name with its layer index replaced by ``*``: the first path
component that is an integer (METHODS.md, notation). ``model.layers.3.self_attn.q_proj`` has type
``model.layers.*.self_attn.q_proj`` and layer 3.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Target:
    """One target linear layer. ``d_out × d_in`` is the orientation of ``nn.Linear.weight``."""

    name: str
    module_type: str
    layer: int
    d_in: int
    d_out: int
    transposed: bool  # transformers' Conv1D stores its weight as (d_in, d_out)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    """True for the layers entrolora can adapt: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer, whatever the weight's storage orientation."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


def split_module_name(name: str) -> tuple[str, int]:
    """``(module type, layer index)`` of a qualified name; ValueError if it holds no integer."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1 :]), int(part)
    raise ValueError(
        f"module {name!r} has no layer index (no path component is an integer); entrolora "
        "adapts layers of repeated blocks such as 'model.layers.3.self_attn.q_proj'. "
        "Choose target_modules inside the model's layer stack."
    )


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _close(pattern: str, names: Sequence[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    found = difflib.get_close_matches(pattern, leaves, n=5, cutoff=0.5)
    found += difflib.get_close_matches(pattern, list(names), n=3, cutoff=0.6)
    return found or leaves[:10]


# Every linear layer inside the layer stack (attention and MLP): the candidates of the ``auto``
# planner (METHODS.md §7). peft's selector of the same name also skips the output layer.
ALL_LINEAR = "all-linear"


def is_all_linear(target_modules: object) -> bool:
    """True for ``"all-linear"`` or ``["all-linear"]``."""
    if isinstance(target_modules, str):
        return target_modules == ALL_LINEAR
    return isinstance(target_modules, (list, tuple)) and list(target_modules) == [ALL_LINEAR]


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> dict[str, Target]:
    """The target linear layers of ``model``, keyed by qualified name, ordered by type then layer.

    ``target_modules`` is a list of suffixes (``"q_proj"``) or full names, each of which must
    match at least one module, or one string taken as a regular expression matched against the
    whole qualified name (as peft does), or ``"all-linear"``: every linear layer inside the layer
    stack (heads, poolers and embeddings sit outside it). Every matched module must be linear and
    sit inside a layer stack; anything else raises ``ValueError`` naming the pattern and close
    candidates.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    if is_all_linear(target_modules):
        picked = [(n, m) for n, m in named if is_linear(m) and _in_stack(n)]
        if not picked:
            raise ValueError(
                "target_modules 'all-linear' found no linear layer inside a layer stack (a "
                "module path with a layer index); name the target modules instead"
            )
        by_pattern = {ALL_LINEAR: picked}
    elif isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules regex {target_modules!r} is invalid: {e}") from None
        picked = [(n, m) for n, m in named if regex.fullmatch(n)]
        if not picked:
            raise ValueError(
                f"target_modules regex {target_modules!r} matched no module; it must match the "
                f"whole qualified name. Close names: {', '.join(_close(target_modules, names))}"
            )
        by_pattern = {target_modules: picked}
    else:
        if len(target_modules) == 0:
            raise ValueError("target_modules is empty; name at least one module, e.g. ['q_proj']")
        by_pattern = {}
        for pattern in target_modules:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(
                    f"target_modules entries must be non-empty strings, got {pattern!r}"
                )
            picked = [(n, m) for n, m in named if _matches(pattern, n)]
            if not picked:
                raise ValueError(
                    f"target module {pattern!r} matched no module of the model. "
                    f"Close candidates: {', '.join(_close(pattern, names))}"
                )
            by_pattern[pattern] = picked

    targets: dict[str, Target] = {}
    for pattern, picked in by_pattern.items():
        for name, module in picked:
            if not is_linear(module):
                linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named if is_linear(m)})
                raise ValueError(
                    f"target module pattern {pattern!r} matches {name!r}, a "
                    f"{type(module).__name__}, not a linear layer; entrolora adapts nn.Linear and "
                    f"Conv1D only. Linear candidates: {', '.join(linear_leaves[:12])}"
                )
            try:
                module_type, layer = split_module_name(name)
            except ValueError as e:
                raise ValueError(f"target module pattern {pattern!r}: {e}") from None
            d_in, d_out = linear_dims(module)
            targets[name] = Target(name, module_type, layer, d_in, d_out, is_conv1d(module))
    return dict(sorted(targets.items(), key=lambda kv: _order_key(kv[1])))


def _in_stack(name: str) -> bool:
    return any(part.isdigit() for part in name.split(".")) and not name.endswith(".base_layer")


def _order_key(t: Target) -> tuple[str, int]:
    return (t.module_type, t.layer)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; ValueError naming it when the model has none."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the model has no module {name!r}; the plan or statistics were made for another "
            "model. Re-run the probe/planner on this model."
        ) from None
