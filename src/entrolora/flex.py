"""FlexLoRA controller: entropy-guided rank pruning and expansion during training (METHODS.md §5).

Every ``FlexAdapter`` of a model holds ``c`` slots of which ``r`` are active. At scheduled steps
the controller ranks the adapted matrices by the spectral entropy of their active λ (eq. 3),
takes one direction from each of the ``b(t)`` least important (the slot of smallest ``|λ|``) and
gives one zero-impact direction to each of the ``b(t)`` most important (λ = 0, fresh Gaussian P
column / Q row from the controller's own generator), so the total active rank never changes.
The optimizer is kept: only the moments of the touched slots are zeroed.

Use, in any loop::

    flex = el.FlexLoRA(model, total_steps=T)
    for t, batch in enumerate(batches):
        loss = model(**batch).loss + flex.regularizer()
        loss.backward()
        flex.step(t, optimizer)        # after backward, before optimizer.step()
        optimizer.step(); optimizer.zero_grad()

Decisions are pure functions of λ, which DDP keeps identical on every process, so all processes
make the same moves without communicating.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters.flex import FlexAdapter
from .files import atomic_write, atomic_write_text

FORMAT = "entrolora.flex"
FORMAT_VERSION = 1
STATE_FILE = "flex_state.json"
EPS = 1e-12
# Per-element optimizer state that describes one slot: zeroed when the slot is pruned or
# expanded. Other per-element keys are left as they are, with a warning.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

History = list[tuple[int, dict[str, int]]]


# -- the pure parts: schedule, importance, selection -------------------------------------------
@dataclass(frozen=True)
class FlexSchedule:
    """When and how much rank moves (METHODS.md §5 eq. 4, made well-defined).

    Adjustments happen at steps ``t`` with ``t_warmup ≤ t < T − t_final`` and
    ``(t − t_warmup) mod interval = 0``, moving
    ``b(t) = round(b0·(1 − (t − t_warmup)/(T − t_final − t_warmup))³)`` directions, clamped to
    ``[0, b0]`` (``round`` is Python's, half to even).
    """

    total_steps: int
    b0: int = 4
    t_warmup: int = 0
    t_final: int = 0
    interval: int = 1

    def __post_init__(self) -> None:
        for name in ("total_steps", "b0", "t_warmup", "t_final", "interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"FlexLoRA {name} must be an int, got {type(v).__name__} {v!r}")
        if self.total_steps < 1:
            raise ValueError(f"FlexLoRA total_steps must be ≥ 1, got {self.total_steps}")
        if self.b0 < 0 or self.t_warmup < 0 or self.t_final < 0:
            raise ValueError(
                f"FlexLoRA b0, t_warmup and t_final must be ≥ 0; got b0={self.b0}, "
                f"t_warmup={self.t_warmup}, t_final={self.t_final}"
            )
        if self.interval < 1:
            raise ValueError(f"FlexLoRA interval must be ≥ 1, got {self.interval}")
        if self.span <= 0:
            raise ValueError(
                f"FlexLoRA schedule refused: T − t_final − t_warmup = {self.total_steps} − "
                f"{self.t_final} − {self.t_warmup} = {self.span} ≤ 0 leaves no step to adjust "
                "ranks; lower t_warmup / t_final or raise total_steps"
            )

    @classmethod
    def default(
        cls,
        total_steps: int,
        b0: int = 4,
        t_warmup: int | None = None,
        t_final: int | None = None,
        interval: int | None = None,
    ) -> FlexSchedule:
        """Fill unset values: warm-up and final phase 10 % of T each, about 20 adjustments."""
        if isinstance(total_steps, int) and total_steps >= 1:
            t_warmup = total_steps // 10 if t_warmup is None else t_warmup
            t_final = total_steps // 10 if t_final is None else t_final
            if interval is None and isinstance(t_warmup, int) and isinstance(t_final, int):
                interval = max(1, (total_steps - t_final - t_warmup) // 20)
        return cls(total_steps, b0, t_warmup or 0, t_final or 0, interval or 1)

    @property
    def span(self) -> int:
        """``T − t_final − t_warmup``: the length of the adjustment phase."""
        return self.total_steps - self.t_final - self.t_warmup

    def is_adjustment_step(self, t: int) -> bool:
        """True when step ``t`` is one of the scheduled adjustment steps (even if b(t) = 0)."""
        return (
            self.t_warmup <= t < self.total_steps - self.t_final
            and (t - self.t_warmup) % self.interval == 0
        )

    def budget(self, t: int) -> int:
        """``b(t)``, the directions moved at step ``t``; 0 off the schedule."""
        if not self.is_adjustment_step(t):
            return 0
        b = round(self.b0 * (1.0 - (t - self.t_warmup) / self.span) ** 3)
        return min(max(b, 0), self.b0)

    def steps(self) -> list[int]:
        """All scheduled adjustment steps, ascending."""
        return list(range(self.t_warmup, self.total_steps - self.t_final, self.interval))


def spectral_importance(lam: torch.Tensor | Sequence[float]) -> float:
    """Spectral-entropy importance of one matrix from its active λ (METHODS.md §5 eq. 3).

    ``s_i = λ_i²/Σλ_j²``, ``I = −(1/log r)·Σ s_i·log(s_i + 1e-12)`` in float64; 0 when r ≤ 1 or
    all λ = 0.
    """
    lam = torch.as_tensor(lam, dtype=torch.float64).flatten()
    r = lam.numel()
    energy = lam.square()
    total = energy.sum()
    if r <= 1 or total == 0:
        return 0.0
    s = energy / total
    return float(-(s * torch.log(s + EPS)).sum() / math.log(r))


def select_moves(
    importance: Sequence[float],
    ranks: Sequence[int],
    capacities: Sequence[int],
    budget: int,
    r_min: int = 1,
) -> tuple[list[int], list[int]]:
    """Which matrices lose and which gain one direction: ``(prune, expand)`` index lists.

    Matrices are sorted by importance, ties broken by index. Prune candidates: from the least
    important up, those with ``r > r_min``; expand candidates: from the most important down,
    those with ``r < capacity``. The k-th pair is taken while ``k < budget`` and the k-th prune
    candidate ranks strictly below the k-th expand candidate, so both sets are disjoint, equal in
    size and every pruned matrix is less important than every expanded one.
    """
    order = sorted(range(len(importance)), key=lambda i: (importance[i], i))
    pos = {i: p for p, i in enumerate(order)}
    low = [i for i in order if ranks[i] > r_min]
    high = [i for i in reversed(order) if ranks[i] < capacities[i]]
    n = 0
    while n < min(budget, len(low), len(high)) and pos[low[n]] < pos[high[n]]:
        n += 1
    return low[:n], high[:n]


# -- the controller ----------------------------------------------------------------------------
def flex_adapters(model: nn.Module) -> dict[str, FlexAdapter]:
    """``{target module name: FlexAdapter}`` of a model in module order (DDP/compile unwrapped).

    The name is the adapter's qualified name without the wrapper's trailing ``.adapter``.
    """
    model = _unwrap(model)
    out: dict[str, FlexAdapter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, FlexAdapter) and id(module) not in seen:
            seen.add(id(module))
            out[name.removesuffix(".adapter")] = module
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the model at .module, torch.compile at ._orig_mod.
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class FlexLoRA:
    """Moves rank between a model's FlexAdapters during training (METHODS.md §5).

    ``total_steps`` T, ``b0`` initial adjustment size, ``t_warmup`` / ``t_final`` (default T//10
    each) and ``interval`` ΔT (default: about 20 adjustments) make the schedule; ``gamma`` weighs
    the orthogonality regulariser; ``r_min`` is the smallest rank a prune may leave; new
    directions are drawn with std ``init_std`` from a generator seeded by ``seed``.
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
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        self.schedule = FlexSchedule.default(total_steps, b0, t_warmup, t_final, interval)
        if not (isinstance(gamma, (int, float)) and gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"FlexLoRA gamma must be a finite number ≥ 0, got {gamma!r}")
        if not (isinstance(init_std, (int, float)) and init_std > 0 and math.isfinite(init_std)):
            raise ValueError(f"FlexLoRA init_std must be a finite number > 0, got {init_std!r}")
        if isinstance(r_min, bool) or not isinstance(r_min, int) or r_min < 1:
            raise ValueError(f"FlexLoRA r_min must be an int ≥ 1, got {r_min!r}")
        self.modules = flex_adapters(model)
        if not self.modules:
            raise ValueError(
                "the model has no FlexLoRA adapters; build it with "
                "el.apply(model, el.plan_flexlora(model, r=8, target_modules=[...])) first"
            )
        self.ranks: dict[str, int] = {n: a.rank for n, a in self.modules.items()}
        groups: dict[tuple, list[FlexAdapter]] = {}
        for a in self.modules.values():
            key = (a.d_out, a.d_in, a.capacity, a.P.dtype, a.P.device)
            groups.setdefault(key, []).append(a)
        self._groups = list(groups.values())
        low = {n: r for n, r in self.ranks.items() if r < r_min}
        if low:
            name, r = next(iter(low.items()))
            raise ValueError(
                f"FlexLoRA r_min={r_min} is above the rank {r} of {name!r} "
                f"({len(low)} module(s) below it); use r_min ≤ {min(self.ranks.values())}"
            )
        self.gamma = float(gamma)
        self.r_min = r_min
        self.init_std = float(init_std)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: History = []
        self.last_step: int | None = None
        self._checked_optimizers: set[int] = set()
        self._warned_keys: set[str] = set()

    # -- options and totals --------------------------------------------------------------------
    @property
    def options(self) -> dict[str, Any]:
        """The constructor's options (schedule resolved), as stored in ``state_dict``."""
        return {
            **asdict(self.schedule),
            "gamma": self.gamma,
            "r_min": self.r_min,
            "init_std": self.init_std,
            "seed": self.seed,
        }

    @property
    def total_rank(self) -> int:
        """Sum of active ranks: the parameter budget, constant through training."""
        return sum(self.ranks.values())

    # -- the regulariser -----------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor:
        """``γ·Σ (‖PₐᵀPₐ − I‖²_F + ‖QₐQₐᵀ − I‖²_F)`` over modules (eq. 2), a float32 scalar to add
        to the loss."""
        first = next(iter(self.modules.values()))
        if self.gamma == 0:
            return torch.zeros((), device=first.P.device)
        # One batched computation per shape group (a handful in a transformer) instead of one
        # per module: the same sum, far fewer kernel launches on the hot path.
        total = torch.zeros((), device=first.P.device)
        for group in self._groups:
            m = torch.stack([a.mask for a in group]).to(torch.float32)  # (G, c)
            p = torch.stack([a.P for a in group]).float() * m[:, None, :]  # (G, d_out, c)
            q = torch.stack([a.Q for a in group]).float() * m[:, :, None]  # (G, c, d_in)
            eye = torch.diag_embed(m)  # (G, c, c), zero on inactive slots
            total = total + ((p.mT @ p - eye) ** 2).sum() + ((q @ q.mT - eye) ** 2).sum()
        return self.gamma * total

    @torch.no_grad()
    def add_regularizer_grad(self) -> None:
        """Add ``∇ regularizer()`` to the ``.grad`` of every P and Q, without autograd.

        For loops that cannot add the regulariser to the loss (the Trainer callback). Every
        process adds the same values, so no all-reduce is needed under DDP.
        """
        if self.gamma == 0:
            return
        for a in self.modules.values():
            gp, gq = a.orthogonality_grad()
            for param, g in ((a.P, gp), (a.Q, gq)):
                if param.grad is None:
                    param.grad = self.gamma * g
                else:
                    param.grad.add_(g, alpha=self.gamma)

    # -- importance ----------------------------------------------------------------------------
    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """λ (float64) and masks of every module on the CPU, in one device transfer."""
        adapters = list(self.modules.values())
        if len({a.lambda_.device for a in adapters}) == 1:
            lam = torch.cat([a.lambda_.detach().to(torch.float64) for a in adapters]).cpu()
            mask = torch.cat([a.mask.detach() for a in adapters]).cpu()
        else:  # a model spread over devices (device_map): one transfer per module
            lam = torch.cat([a.lambda_.detach().to("cpu", torch.float64) for a in adapters])
            mask = torch.cat([a.mask.detach().cpu() for a in adapters])
        sizes = [a.capacity for a in adapters]
        names = list(self.modules)
        return (
            dict(zip(names, lam.split(sizes))),
            dict(zip(names, mask.split(sizes))),
        )

    def importance(self) -> dict[str, float]:
        """``{module: I}``, the spectral entropy of each module's active λ (eq. 3)."""
        lam, mask = self._snapshot()
        return {n: spectral_importance(lam[n][mask[n]]) for n in self.modules}

    # -- one step ------------------------------------------------------------------------------
    def step(
        self, step: int, optimizer: torch.optim.Optimizer | None
    ) -> tuple[list[str], list[str]]:
        """Adjust ranks if ``step`` is scheduled; returns ``(pruned, expanded)`` module names.

        Call after ``backward()`` and before ``optimizer.step()``. Off the schedule it returns at
        once without touching the device. Pass ``optimizer=None`` only when its state cannot be
        addressed per parameter (DeepSpeed ZeRO / FSDP flat parameters): moments of moved slots
        are then not reset. A step at or before the last adjustment step is ignored, so calling
        twice for one step (or resuming) never adjusts twice.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"FlexLoRA.step needs the int step index, got {step!r}")
        done = self.history[-1][0] if self.history else None
        if not self.schedule.is_adjustment_step(step) or (done is not None and step <= done):
            return [], []
        if optimizer is not None:
            self._check_optimizer(optimizer)
        self.last_step = step
        lam, mask = self._snapshot()
        names = list(self.modules)
        imp = [spectral_importance(lam[n][mask[n]]) for n in names]
        ranks = [int(mask[n].sum()) for n in names]
        caps = [self.modules[n].capacity for n in names]
        prune, expand = select_moves(imp, ranks, caps, self.schedule.budget(step), self.r_min)
        for i in prune:
            self._prune(names[i], lam[names[i]], mask[names[i]], optimizer)
        for i in expand:
            self._expand(names[i], mask[names[i]], optimizer)
        self.history.append((step, dict(self.ranks)))
        return [names[i] for i in prune], [names[i] for i in expand]

    def prune(self, name: str, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Deactivate the active slot of smallest ``|λ|`` of module ``name``; returns the slot.

        Outside the schedule: for tests and manual surgery (no history entry).
        """
        self._need(name)
        lam, mask = self._snapshot()
        if self.ranks[name] <= self.r_min:
            raise ValueError(
                f"cannot prune {name!r}: its rank {self.ranks[name]} is already at "
                f"r_min={self.r_min}"
            )
        return self._prune(name, lam[name], mask[name], optimizer)

    def expand(self, name: str, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Activate a free slot of module ``name`` with zero impact; returns the slot."""
        self._need(name)
        _, mask = self._snapshot()
        if self.ranks[name] >= self.modules[name].capacity:
            raise ValueError(
                f"cannot expand {name!r}: all {self.modules[name].capacity} slots are active; "
                "plan a larger capacity"
            )
        return self._expand(name, mask[name], optimizer)

    def _need(self, name: str) -> None:
        if name not in self.modules:
            raise ValueError(f"{name!r} is not a FlexLoRA module; known: {', '.join(self.modules)}")

    def _prune(self, name: str, lam: torch.Tensor, mask: torch.Tensor, optimizer: Any) -> int:
        # Smallest |λ| among active slots; ties go to the lowest slot (argmin returns the first).
        slot = int(torch.where(mask, lam.abs(), torch.inf).argmin())
        adapter = self.modules[name]
        adapter.deactivate(slot)
        # The backward that preceded this call gave the slot a gradient; clearing it and the
        # moments keeps the now inactive slot exactly zero through the coming optimizer step.
        _clear_slot(adapter, slot, optimizer, self._warned_keys)
        self.ranks[name] -= 1
        return slot

    def _expand(self, name: str, mask: torch.Tensor, optimizer: Any) -> int:
        slot = int((~mask).nonzero()[0])
        adapter = self.modules[name]
        p_col = torch.randn(adapter.d_out, generator=self.generator) * self.init_std
        q_row = torch.randn(adapter.d_in, generator=self.generator) * self.init_std
        adapter.activate(slot, p_col, q_row)
        _clear_slot(adapter, slot, optimizer, self._warned_keys)
        self.ranks[name] += 1
        return slot

    def _check_optimizer(self, optimizer: Any) -> None:
        if id(optimizer) in self._checked_optimizers:
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [
            n for n, a in self.modules.items() if not {id(a.P), id(a.lambda_), id(a.Q)} <= held
        ]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the FlexLoRA parameters of {len(missing)} module(s) "
                f"(first: {missing[0]!r}); build it from el.trainable_parameters(model) / "
                "model.parameters() after el.apply, or pass optimizer=None where the optimizer "
                "keeps flat parameters (ZeRO, FSDP) and its moments cannot be reset per slot"
            )
        self._checked_optimizers.add(id(optimizer))

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
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"FlexLoRA state is malformed: {e!r}") from None
        if strict and options != self.options:
            diff = {k: (options.get(k), v) for k, v in self.options.items() if options.get(k) != v}
            raise ValueError(
                f"FlexLoRA state was saved with other options {diff} (saved, current); build the "
                "controller with the saved options (FlexLoRA.from_checkpoint) or pass strict=False"
            )
        if set(ranks) != set(self.modules):
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


def _clear_slot(adapter: FlexAdapter, slot: int, optimizer: Any, warned: set[str]) -> None:
    """Zero the gradient and the optimizer moments of one slot of P, λ and Q.

    Scalar state (``step``) and state shaped unlike the parameter (factored statistics) is
    untouched; unknown per-element keys are left as they are and reported once.
    """
    parts = ((adapter.P, (slice(None), slot)), (adapter.lambda_, (slot,)), (adapter.Q, (slot,)))
    state = optimizer.state if optimizer is not None else {}
    for param, index in parts:
        if param.grad is not None:
            param.grad[index] = 0
        st = state.get(param) if hasattr(state, "get") else None
        if not st:
            continue
        for key, value in st.items():
            if not torch.is_tensor(value) or value.shape != param.shape:
                continue
            if key in MOMENT_KEYS:
                value[index] = 0
            elif key not in warned:
                warned.add(key)
                warnings.warn(
                    f"FlexLoRA does not know the optimizer state {key!r}; it is left unchanged "
                    f"for moved slots (reset only: {', '.join(MOMENT_KEYS)})",
                    stacklevel=4,
                )


# -- the plot ----------------------------------------------------------------------------------
def _depth_key(name: str, index: int) -> tuple[int, int]:
    from .targets import split_module_name

    try:
        return split_module_name(name)[1], index
    except ValueError:
        return -1, index


def rank_matrix(
    history: Iterable[tuple[int, Mapping[str, int]]],
) -> tuple[list[str], list[int], list[list[int]]]:
    """``(modules sorted by depth, steps, ranks[module][step])`` from a FlexLoRA history."""
    history = list(history)
    if not history:
        raise ValueError(
            "the FlexLoRA history is empty: no adjustment step has run yet "
            "(train past t_warmup, or check the schedule)"
        )
    first = list(history[0][1])
    names = sorted(first, key=lambda n: _depth_key(n, first.index(n)))
    steps = [int(s) for s, _ in history]
    ranks = [[int(r.get(n, 0)) for _, r in history] for n in names]
    return names, steps, ranks


def plot_rank_evolution(
    history: Iterable[tuple[int, Mapping[str, int]]],
    path: str | os.PathLike,
    title: str = "FlexLoRA rank evolution",
) -> Path:
    """Heatmap of active ranks, modules (by depth) × adjustment steps, as the paper's Figure 2.

    Writes a PNG (matplotlib, Agg) atomically; returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, steps, ranks = rank_matrix(history)
    height = min(2 + 0.18 * len(names), 30)
    width = min(4 + 0.25 * len(steps), 24)
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        im = ax.imshow(ranks, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel("training step (adjustment steps)")
        ax.set_ylabel("adapted module (by depth)")
        ax.set_title(title)
        xt = range(0, len(steps), max(1, len(steps) // 12))
        ax.set_xticks(list(xt), [str(steps[i]) for i in xt], rotation=45)
        yt = range(0, len(names), max(1, len(names) // 40))
        ax.set_yticks(list(yt), [names[i] for i in yt], fontsize=7)
        fig.colorbar(im, ax=ax, label="active rank")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return Path(path)
