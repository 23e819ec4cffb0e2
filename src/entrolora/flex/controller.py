"""FlexLoRA controller: entropy-guided rank pruning and expansion during training (METHODS.md §5).

Every ``FlexAdapter`` of a model holds ``c`` slots of which ``r`` are active. At scheduled steps
the controller ranks the adapted matrices by the spectral entropy of their update's exact
singular values (eq. 3), takes from each of the ``b(t)`` least important the direction whose own
term ``|λ_i|·‖p_i‖·‖q_i‖`` is smallest, and gives each of the ``b(t)`` most important a
zero-impact direction initialised as the first ones (``init="lora"``: P column 0, λ = 1, Q row
Kaiming-uniform), so the total active rank never changes. The optimizer is kept: the touched
slots' moments are zeroed and, under Adam/AdamW, their updates corrected to a fresh parameter's
(``entrolora.flex_optim``).

Use, in any loop::

    flex = el.FlexLoRA(model, total_steps=T)
    for t, batch in enumerate(batches):
        loss = model(**batch).loss + flex.regularizer()
        loss.backward()
        flex.step(t, optimizer)        # after backward, before optimizer.step()
        optimizer.step(); optimizer.zero_grad()

Decisions are pure functions of values that DDP / FSDP2 keep identical on every process, so all
processes make the same moves without communicating.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.flex import FlexAdapter, new_directions
from ..adapters.flex_ops import (
    add_grad,
    direction_terms,
    full,
    gram_distance,
    gram_distance_grad,
    no_autocast,
    spectral_entropy,
    update_spectra,
)
from ..adapters.inject import unwrap
from ..files import atomic_write_text
from .optim import FreshSlots, base_optimizer, clear_slot
from .plot import plot_rank_evolution, rank_matrix  # noqa: F401  (public here since v0.1)
from .schedule import FlexSchedule, select_moves, spectral_importance  # noqa: F401

FORMAT = "entrolora.flex"
FORMAT_VERSION = 2
STATE_FILE = "flex_state.json"
IMPORTANCE = ("spectrum", "lambda")
UNSUPPORTED = (
    "FlexLoRA runs in one process, under DDP and under FSDP2 (torch.distributed.fsdp."
    "fully_shard); FSDP1 (FullyShardedDataParallel) and DeepSpeed ZeRO-3 flatten P, λ and Q "
    "into shards it cannot address — shard with fully_shard instead"
)

History = list[tuple[int, dict[str, int]]]
Snapshot = tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]


def flex_adapters(model: nn.Module) -> dict[str, FlexAdapter]:
    """``{target module name: FlexAdapter}`` of a model in module order (DDP/compile unwrapped).

    The name is the adapter's qualified name without the wrapper's trailing ``.adapter``.
    """
    out: dict[str, FlexAdapter] = {}
    seen: set[int] = set()
    for name, module in unwrap(model).named_modules():
        if isinstance(module, FlexAdapter) and id(module) not in seen:
            seen.add(id(module))
            out[name.removesuffix(".adapter")] = module
    return out


def _check_option(name: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"FlexLoRA {name} must be {want}, got {value!r}")


class FlexLoRA:
    """Moves rank between a model's FlexAdapters during training (METHODS.md §5).

    ``total_steps`` T, ``b0`` initial adjustment size, ``t_warmup`` / ``t_final`` and ``interval``
    ΔT (defaults: ``FlexSchedule.default``) make the schedule; ``gamma`` weighs the orthogonality
    regulariser; ``r_min`` is the smallest rank a prune may leave; ``importance`` is "spectrum"
    (the update's exact singular values, prune by each direction's own term) or "lambda" (the
    paper's literal reading: eq. 3 on λ, prune the smallest |λ|); new directions follow each
    adapter's ``init`` and are drawn from a generator seeded by ``seed``.
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        b0: int = 4,
        t_warmup: int | None = None,
        t_final: int | None = None,
        interval: int | None = None,
        gamma: float = 0.1,
        r_min: int = 1,
        importance: str = "spectrum",
        seed: int = 0,
    ) -> None:
        self.schedule = FlexSchedule.default(total_steps, b0, t_warmup, t_final, interval)
        ok = isinstance(gamma, (int, float)) and gamma >= 0 and math.isfinite(gamma)
        _check_option("gamma", gamma, ok, "a finite number ≥ 0")
        ok = not isinstance(r_min, bool) and isinstance(r_min, int) and r_min >= 1
        _check_option("r_min", r_min, ok, "an int ≥ 1")
        _check_option("importance", importance, importance in IMPORTANCE, " or ".join(IMPORTANCE))
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
            raise ValueError(UNSUPPORTED)
        self.modules = flex_adapters(model)
        if not self.modules:
            raise ValueError(
                "the model has no FlexLoRA adapters; build it with "
                "el.apply(model, el.plan_flexlora(model, r=8, target_modules=[...])) first"
            )
        if any(hasattr(a.P, "ds_id") for a in self.modules.values()):
            raise ValueError(UNSUPPORTED)
        self.ranks: dict[str, int] = {n: a.rank for n, a in self.modules.items()}
        low = {n: r for n, r in self.ranks.items() if r < r_min}
        if low:
            name, r = next(iter(low.items()))
            raise ValueError(
                f"FlexLoRA r_min={r_min} is above the rank {r} of {name!r} "
                f"({len(low)} module(s) below it); use r_min ≤ {min(self.ranks.values())}"
            )
        groups: dict[tuple, list[FlexAdapter]] = {}
        for a in self.modules.values():
            groups.setdefault((a.d_out, a.d_in, a.capacity, a.P.dtype, a.P.device), []).append(a)
        self._groups = list(groups.values())
        self._device = next(iter(self.modules.values())).P.device
        self.gamma, self.r_min, self.importance_kind = float(gamma), r_min, importance
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: History = []
        self.last_step: int | None = None
        self.fresh = FreshSlots(self.modules)
        self._hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._warned_keys: set[str] = set()

    # -- options and totals --------------------------------------------------------------------
    @property
    def options(self) -> dict[str, Any]:
        """The constructor's options (schedule resolved), as stored in ``state_dict``."""
        return {
            **asdict(self.schedule),
            "gamma": self.gamma,
            "r_min": self.r_min,
            "importance": self.importance_kind,
            "seed": self.seed,
        }

    @property
    def total_rank(self) -> int:
        """Sum of active ranks: the parameter budget, constant through training."""
        return sum(self.ranks.values())

    # -- the regulariser -----------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor:
        """``γ·mean(‖PₐᵀPₐ − I‖_F, ‖QₐQₐᵀ − I‖_F over every P and Q)`` (§5, revised), a float32
        scalar to add to the loss; computed outside autocast, one batch per shape group."""
        if self.gamma == 0:
            return torch.zeros((), device=self._device)
        total = torch.zeros((), device=self._device)
        with no_autocast(self._device):
            for group in self._groups:
                m = torch.stack([a.mask for a in group]).float()
                p = torch.stack([full(a.P) for a in group]).float()  # (G, d_out, c)
                q = torch.stack([full(a.Q) for a in group]).float().mT  # (G, d_in, c)
                s = gram_distance(p, m).sum() + gram_distance(q, m).sum()
                total = total + s.to(self._device)
        return total * (self.gamma / (2 * len(self.modules)))

    @torch.no_grad()
    def add_regularizer_grad(self) -> None:
        """Add ``∇ regularizer()`` to the ``.grad`` of every P and Q, without autograd.

        For loops that cannot add the regulariser to the loss (the Trainer callback); the same
        code as the regulariser's backward. Every process adds the same values, so no all-reduce
        is needed under DDP / FSDP2.
        """
        if self.gamma == 0:
            return
        scale = self.gamma / (2 * len(self.modules))
        for group in self._groups:
            m = torch.stack([a.mask for a in group]).float()
            for attr in ("P", "Q"):
                x = torch.stack([full(getattr(a, attr)) for a in group]).float()
                _, g = gram_distance_grad(x if attr == "P" else x.mT, m)
                g = g if attr == "P" else g.mT
                for a, gi in zip(group, g.unbind(0)):
                    add_grad(getattr(a, attr), gi * scale)

    # -- importance ----------------------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self) -> Snapshot:
        """``(importance, per-direction terms, masks)`` of every module, computed per shape group
        on the device and brought to the CPU in one transfer (the step's only sync)."""
        rows = []
        for group in self._groups:
            dev = group[0].P.device
            work = torch.device("cpu") if dev.type == "mps" else dev  # no float64 on MPS
            m = torch.stack([a.mask for a in group]).to(work)
            lam = torch.stack([full(a.lambda_) for a in group]).to(work)
            if self.importance_kind == "spectrum":
                p = torch.stack([full(a.P) for a in group]).to(work)
                q = torch.stack([full(a.Q) for a in group]).to(work)
                sigma, terms = update_spectra(p, lam, q, m), direction_terms(p, lam, q, m)
            else:  # the paper's reading: eq. 3 on λ, prune the smallest |λ|
                sigma = torch.where(m, lam.to(torch.float64), 0.0)
                terms = torch.where(m, sigma.abs(), torch.inf)
            imp = spectral_entropy(sigma, m.sum(1))
            rows.append(torch.cat([imp[:, None], terms, m.to(torch.float64)], 1).flatten())
        flat = torch.cat([r.to(self._device) for r in rows]).cpu()
        imps, terms, masks = {}, {}, {}
        pos = 0
        by_id = {id(a): n for n, a in self.modules.items()}
        for group in self._groups:
            c = group[0].capacity
            block = flat[pos : pos + len(group) * (1 + 2 * c)].view(len(group), 1 + 2 * c)
            pos += block.numel()
            for a, row in zip(group, block):
                n = by_id[id(a)]
                imps[n], terms[n], masks[n] = float(row[0]), row[1 : 1 + c], row[1 + c :] > 0
        return {n: imps[n] for n in self.modules}, terms, masks

    def importance(self) -> dict[str, float]:
        """``{module: I}``: eq. 3 on each module's update spectrum (or λ, see ``importance``)."""
        return self._snapshot()[0]

    # -- one step ------------------------------------------------------------------------------
    def step(
        self, step: int, optimizer: torch.optim.Optimizer | None
    ) -> tuple[list[str], list[str]]:
        """Adjust ranks if ``step`` is scheduled; returns ``(pruned, expanded)`` module names.

        Call after ``backward()`` and before ``optimizer.step()``, with every step's index.
        Off the schedule it returns at once without touching the device. ``optimizer=None``
        skips the per-slot optimizer reset (an optimizer whose state cannot be addressed per
        parameter). A step at or before the last adjustment step is ignored, so calling twice
        for one step (or resuming) never adjusts twice.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"FlexLoRA.step needs the int step index, got {step!r}")
        if optimizer is not None:
            optimizer = self._attach(optimizer)
        done = self.history[-1][0] if self.history else None
        if not self.schedule.is_adjustment_step(step) or (done is not None and step <= done):
            return [], []
        self.last_step = step
        imp, terms, masks = self._snapshot()
        names = list(self.modules)
        ranks = [int(masks[n].sum()) for n in names]
        caps = [self.modules[n].capacity for n in names]
        scores = [imp[n] for n in names]
        prune, expand = select_moves(scores, ranks, caps, self.schedule.budget(step), self.r_min)
        for i in prune:
            self._prune(names[i], terms[names[i]], optimizer)
        for i in expand:
            self._expand(names[i], masks[names[i]], optimizer)
        self.history.append((step, dict(self.ranks)))
        return [names[i] for i in prune], [names[i] for i in expand]

    def prune(self, name: str, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Deactivate the active slot of smallest own term of module ``name``; returns the slot.

        Outside the schedule: for tests and manual surgery (no history entry).
        """
        self._need(name)
        if self.ranks[name] <= self.r_min:
            raise ValueError(
                f"cannot prune {name!r}: its rank {self.ranks[name]} is already at "
                f"r_min={self.r_min}"
            )
        opt = self._attach(optimizer) if optimizer is not None else None
        return self._prune(name, self._snapshot()[1][name], opt)

    def expand(self, name: str, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Activate a free slot of module ``name`` with zero impact; returns the slot."""
        self._need(name)
        if self.ranks[name] >= self.modules[name].capacity:
            raise ValueError(
                f"cannot expand {name!r}: all {self.modules[name].capacity} slots are active; "
                "plan a larger capacity"
            )
        opt = self._attach(optimizer) if optimizer is not None else None
        return self._expand(name, self._snapshot()[2][name], opt)

    def _need(self, name: str) -> None:
        if name not in self.modules:
            raise ValueError(f"{name!r} is not a FlexLoRA module; known: {', '.join(self.modules)}")

    def _prune(self, name: str, terms: torch.Tensor, optimizer: Any) -> int:
        # Smallest own term among active slots (inactive ones hold inf); ties: the lowest slot.
        slot = int(terms.argmin())
        adapter = self.modules[name]
        adapter.deactivate(slot)
        # The backward that preceded this call gave the slot a gradient; clearing it and the
        # moments keeps the now inactive slot exactly zero through the coming optimizer step.
        clear_slot(adapter, slot, optimizer, self._warned_keys)
        self.fresh.forget(name, slot)
        self.ranks[name] -= 1
        return slot

    def _expand(self, name: str, mask: torch.Tensor, optimizer: Any) -> int:
        slot = int((~mask).nonzero()[0])
        adapter = self.modules[name]
        p, lam, q = new_directions(adapter.d_out, adapter.d_in, 1, adapter.init, self.generator)
        adapter.activate(slot, p[:, 0], q[0], float(lam[0]))
        clear_slot(adapter, slot, optimizer, self._warned_keys)
        self.fresh.record(name, slot, optimizer)
        self.ranks[name] += 1
        return slot

    def _attach(self, optimizer: Any) -> Any:
        """The torch optimizer inside ``optimizer``, checked and hooked once (a dict lookup
        on later calls)."""
        opt = base_optimizer(optimizer)
        if opt in self._hooks:
            return opt
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        missing = [
            n for n, a in self.modules.items() if not {id(a.P), id(a.lambda_), id(a.Q)} <= held
        ]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the FlexLoRA parameters of {len(missing)} module(s) "
                f"(first: {missing[0]!r}); build it from el.trainable_parameters(model) / "
                "model.parameters() after el.apply (after fully_shard under FSDP2), or pass "
                "optimizer=None where its state is flat (DeepSpeed ZeRO)"
            )
        if FreshSlots.corrects(opt):
            self._hooks[opt] = opt.register_step_post_hook(self.fresh.hook)
        else:
            self._hooks[opt] = None
            if not isinstance(opt, torch.optim.SGD):
                warnings.warn(
                    f"FlexLoRA zeroes moved slots' moments of {type(opt).__name__} but corrects "
                    "their bias correction only under torch.optim.Adam / AdamW: a moved slot's "
                    "first updates may differ from a fresh parameter's",
                    stacklevel=3,
                )
        return opt

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able controller state: options, last step, ranks, history and generator state.

        Masks and weights travel with the adapter weights (``el.save``).
        """
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "options": self.options,
            "step": self.last_step,
            "ranks": dict(self.ranks),
            "history": [[s, dict(r)] for s, r in self.history],
            "rng_state": self.generator.get_state().tolist(),
            "young": {
                n: {str(s): list(a) for s, a in y.items()} for n, y in self.fresh.young.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore ``state_dict()`` output. Load the adapter weights (masks) first.

        ``strict``: the stored options must equal this controller's (else resuming would not
        repeat the uninterrupted run's decisions).
        """
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise ValueError("not a FlexLoRA controller state (its 'format' field differs)")
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"FlexLoRA state version {state.get('format_version')} is not {FORMAT_VERSION}; "
                "it was written by another entrolora version"
            )
        try:
            options, ranks = dict(state["options"]), dict(state["ranks"])
            history = [
                (int(s), {str(k): int(v) for k, v in r.items()}) for s, r in state["history"]
            ]
            rng = torch.tensor(state["rng_state"], dtype=torch.uint8)
            step = state["step"]
            young = {
                str(n): {int(s): [int(a[0]), int(a[1])] for s, a in y.items()}
                for n, y in state.get("young", {}).items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"FlexLoRA state is malformed: {e!r}") from None
        if strict and options != self.options:
            diff = {k: (options.get(k), v) for k, v in self.options.items() if options.get(k) != v}
            raise ValueError(
                f"FlexLoRA state was saved with other options {diff} (saved, current); build the "
                "controller with the saved options (FlexLoRA.from_checkpoint) or pass strict=False"
            )
        if set(ranks) != set(self.modules) or not set(young) <= set(self.modules):
            raise ValueError(
                f"FlexLoRA state names {len(ranks)} modules but the model has {len(self.modules)} "
                "FlexLoRA modules; it belongs to another model or plan"
            )
        current = {n: a.rank for n, a in self.modules.items()}
        if current != ranks:
            bad = next(n for n in ranks if ranks[n] != current[n])
            raise ValueError(
                f"the model's active ranks differ from the saved controller's (e.g. {bad!r}: "
                f"{current[bad]} here, {ranks[bad]} saved); load the adapter weights and masks "
                "(el.load) from the same checkpoint before the controller state"
            )
        self.generator.set_state(rng)
        self.history = history
        self.ranks = ranks
        self.last_step = step
        self.fresh.young = young

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``state_dict()`` to ``directory/flex_state.json`` atomically; returns the path."""
        text = json.dumps(self.state_dict(), indent=1) + "\n"
        return atomic_write_text(Path(directory) / STATE_FILE, text)

    @classmethod
    def from_checkpoint(
        cls, model: nn.Module, directory: str | os.PathLike, **options: Any
    ) -> FlexLoRA:
        """A controller for ``model`` (adapters already loaded) resumed from ``directory``.

        Options default to the saved ones; those given here override them.
        """
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ValueError(
                f"{str(path)!r} does not exist; save the controller with "
                "el.save(model, dir, flex=controller) or controller.save(dir)"
            )
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
        if not isinstance(state, dict) or not isinstance(state.get("options"), dict):
            raise ValueError(f"{str(path)!r} is not a FlexLoRA controller state")
        controller = cls(model, **{**state["options"], **options})
        controller.load_state_dict(state, strict=False)
        return controller
