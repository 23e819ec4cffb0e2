"""The memory guard: what a plan's adapters will take, checked before ``el.apply`` allocates them.

The rule: an adapter's training footprint is its allocated elements (FlexLoRA at its capacity,
shared tensors once, frozen VeRA/LoRI matrices included) times the adapter dtype's size times
``TRAINING_COPIES`` (the weights, their gradients and AdamW's two moments). ``apply`` refuses a
plan whose footprint exceeds the memory available on the device the adapters go to (CUDA:
``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of /proc/meminfo), naming the plan, the
estimate and the limit, rather than dying in the allocator (or the OOM killer) minutes later.
"""

from __future__ import annotations

import torch

from ..plans import AdaptationPlan

#: copies of each trainable adapter element while training: weight, gradient, AdamW's m and v
TRAINING_COPIES = 4


def allocated_elements(plan: AdaptationPlan) -> int:
    """Elements the adapters of ``plan`` allocate: trainable ones at their allocated size
    (FlexLoRA: capacity, not the active rank), shared tensors once, frozen factors too."""
    total = plan.num_trainable_params()
    for m in plan.modules.values():
        if m.kind == "flex" and m.capacity:
            total += (m.capacity - m.rank) * (m.d_in + m.d_out + 1)
        elif m.kind == "lori":
            total += m.rank * (m.d_in + m.d_out)  # frozen A, and B's mask
        elif m.kind == "vera":
            total += m.rank * (m.d_in + m.d_out)  # frozen shared A, B (an upper bound)
    return total


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (None where it cannot be told)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_adapter_memory(plan: AdaptationPlan, device: torch.device, dtype: torch.dtype) -> int:
    """ValueError when training ``plan``'s adapters would take more memory than ``device`` has
    free (module docstring); returns the estimate in bytes."""
    from ..guards.output import human_bytes

    itemsize = torch.empty((), dtype=dtype).element_size()
    need = allocated_elements(plan) * itemsize * TRAINING_COPIES
    free = available_bytes(device)
    if free is not None and need > free:
        raise ValueError(
            f"the {plan.method} plan's adapters would take about {human_bytes(need)} to train "
            f"({allocated_elements(plan):,} elements × {itemsize} bytes × {TRAINING_COPIES}: "
            f"weights, gradients, two AdamW moments) and {device} has {human_bytes(free)} free; "
            "lower the ranks (or FlexLoRA's capacity), or use a device with more memory"
        )
    return need
