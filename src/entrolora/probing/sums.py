"""The probe's float32 accumulators: half-sums of the even and odd batches (METHODS.md §1–2).

Each gradient is also dotted with both half-sums before it joins one (``moments``: the
sampling noise of every module's moments, no extra accumulator).

Two sums per distinct target weight, one per half; a step's gradients go to the half that
``begin_step`` names. ``mean_and_noise`` turns them into the mean gradient ``G`` and the noise
estimate ``D`` in place. ``HalfSums`` keeps them on each weight's device, ``HostHalfSums`` in
pinned host memory for CUDA models (``offload="cpu"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .moments import MomentTracker


class HalfSums:
    """float32 sums of the even and of the odd batches, on each weight's own device
    (``offload=None``, or any CPU model). ``half`` selects where the next step goes."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.sums = [
            [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
            for _ in range(2)
        ]
        self.half = 0
        device = params[0].device if params else "cpu"
        self.moments = MomentTracker(len(params), device)

    def begin_step(self, half: int) -> None:
        self.half = half

    def add(self, i: int, g: torch.Tensor) -> None:
        self.moments.observe(i, g, self.sums[0][i], self.sums[1][i])
        self.sums[self.half][i].add_(g)  # promotes bf16/fp16 into the float32 sum, no copy

    def end_step(self) -> None:
        self.moments.end_step(self.half)

    def finish(self) -> list[list[torch.Tensor]]:
        return self.sums

    def close(self) -> None:
        pass


class HostHalfSums:
    """float32 half-sums in pinned host memory for a CUDA model (``offload="cpu"``).

    A gradient is copied asynchronously, on a side stream, into a pinned staging buffer of its
    own dtype; ``record_stream`` keeps its device memory from being reused before the copy ends.
    After the step, one worker thread folds the staging buffers into the step's half while the
    GPU runs the next step; two sets of staging buffers alternate so that the fold of step s and
    the copies of step s+1 never touch the same buffer.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.sums = [
            [torch.zeros(p.shape, dtype=torch.float32, pin_memory=True) for p in params]
            for _ in range(2)
        ]
        self.staging = [
            [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params] for _ in range(2)
        ]
        self.streams = {p.device: torch.cuda.Stream(device=p.device) for p in params}
        self.slot = 0
        self.half = 0
        self.copied: list[list[int]] = [[], []]
        self.pending: list[Future | None] = [None, None]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrolora-probe")
        self.moments = MomentTracker(len(params), "cpu")

    def begin_step(self, half: int) -> None:
        self.half = half

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
        self.pending[slot] = self.pool.submit(self._fold, slot, idx, self.half)
        self.slot = slot ^ 1
        # The next step writes into the other set: its previous fold must be over.
        self._wait(self.slot)

    def _fold(self, slot: int, idx: list[int], half: int) -> None:
        for i in idx:
            self.moments.observe(i, self.staging[slot][i], self.sums[0][i], self.sums[1][i])
            self.sums[half][i].add_(self.staging[slot][i])
        self.moments.end_step(half)  # folds run one at a time, in step order

    def _wait(self, slot: int) -> None:
        fut, self.pending[slot] = self.pending[slot], None
        if fut is not None:
            fut.result()

    def finish(self) -> list[list[torch.Tensor]]:
        self._wait(0)
        self._wait(1)
        return self.sums

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def mean_and_noise(
    sums: list[list[torch.Tensor]], counts: tuple[int, int]
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """``G = (s₁ + s₂)/S`` and ``D = √(n₁n₂)/S · (s₁/n₁ − s₂/n₂)`` per weight (METHODS.md §2).

    In place: the first half's buffer becomes G, the second's is replaced by D, so that at most
    one extra tensor of one weight is alive. ``D`` is None when a half is empty (one batch).
    """
    n1, n2 = counts
    total = n1 + n2
    means, noises = sums[0], sums[1]
    if n1 == 0 or n2 == 0:
        for a, b in zip(means, noises):
            a.add_(b).div_(total)
        return means, None
    c = math.sqrt(n1 * n2) / total
    for i, (a, b) in enumerate(zip(means, noises)):
        d = a.mul(c / n1).sub_(b, alpha=c / n2)
        a.add_(b).div_(total)  # G exactly as one sum over all S batches, divided by S
        noises[i] = d
    return means, noises


__all__ = ["HalfSums", "HostHalfSums", "mean_and_noise"]
