"""The probe's classifier head (``probe(..., head=)``; issue 14 item 5, moved here by issue 33).

A freshly drawn classification head sends each seed's gradients along its own random direction,
so a classifier's plan moved with the seed more than with the calibration batches
(docs/benchmarks.md §3). ``head="centroid"`` (``probe``'s default) probes through the *centroid
head* of the calibration batches instead: it depends on the model and the data only.
``head="model"`` keeps the loaded head (the papers' reading).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .comm import all_reduce_sum, rank_world, to_device

HEAD_NAMES = ("classifier", "score")
HEADS = ("centroid", "model")


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classification head(s) of a sequence classifier (``classifier`` / ``score``)."""
    return {
        n: getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)
    }


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The classifier's last linear layer (``classifier``, ``score``, or the last ``nn.Linear``
    inside such a head, e.g. RoBERTa's ``out_proj``); None for a model without one."""
    layers = [m for h in head_modules(model).values() for m in h.modules()]
    layers = [m for m in layers if isinstance(m, nn.Linear)]
    return layers[-1] if layers else None


@contextmanager
def centroid_head(model: nn.Module, batches: Sequence[dict[str, Any]]) -> Iterator[bool]:
    """Inside the block, the output layer of ``model``'s classifier is the centroid head of
    ``batches``: row c is the mean of the layer's input over the examples of class c minus the
    mean over all, the rows scaled to the Frobenius norm of the model's init (``config.
    initializer_range``·√(out·in); else the loaded weight's), the bias 0. On exit
    the loaded weights come back. Yields whether it applied (False: no output layer, no
    integer ``labels``, or fewer than two classes in the batches; the head is then untouched).

    Why: a freshly drawn head sends each seed's gradients along its own random direction, and
    plans moved with the seed more than with the calibration batches (docs/benchmarks.md §3).
    The centroid head depends on the model and the data only, keeps the init's scale (logits
    near 0, so the gradients are not shrunk as by a fitted head), and points where the classes
    differ. The features come from one forward pass without gradients per batch in which the
    layer passes its input through (a forward hook): the model's own pooling (first token, last
    non-pad token) then hands over exactly the layer's input. Several processes: the class sums
    are global.
    """
    layer = output_layer(model)
    rows = None if layer is None else _centroid_rows(model, layer, batches)
    if rows is None:
        yield False
        return
    saved = [p.detach().clone() for p in layer.parameters()]
    # the init's scale, from the config where it says (the same for every seed), else the
    # loaded weight's: logits stay near 0, as at the start of fine-tuning
    std = getattr(getattr(model, "config", None), "initializer_range", None)
    norm = std * layer.weight.numel() ** 0.5 if std else float(saved[0].norm())
    with torch.no_grad():
        layer.weight.copy_(rows * (norm / rows.norm()))
        if layer.bias is not None:
            layer.bias.zero_()
    try:
        yield True
    finally:
        with torch.no_grad():
            for p, old in zip(layer.parameters(), saved):
                p.copy_(old)


def _centroid_rows(
    model: nn.Module, layer: nn.Linear, batches: Sequence[dict[str, Any]]
) -> torch.Tensor | None:
    """Centred class means of ``layer``'s input, ``(out_features, in_features)`` float64 on the
    layer's device, or None when there is nothing to centre (see ``centroid_head``)."""

    classes, width = layer.out_features, layer.in_features
    dev = layer.weight.device
    sums = torch.zeros(classes, width, dtype=torch.float64, device=dev)
    counts = torch.zeros(classes, dtype=torch.float64, device=dev)
    # the layer hands its input on as its output: the model's own pooling then does the rest
    bypass = layer.register_forward_hook(lambda _layer, args, _out: args[0])
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, dict):
                    return None  # batches for a loss_fn: no labels to read
                batch = to_device(batch, dev)
                labels = batch.get("labels")
                if labels is None or labels.is_floating_point():
                    return None
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                out = model(**inputs)
                feats = getattr(out, "logits", out)
                if not isinstance(feats, torch.Tensor):
                    return None  # an output we cannot read the layer's input from
                feats = feats.to(dev, torch.float64)
                if tuple(feats.shape) != (len(labels), width):
                    return None  # a head whose input is not one vector per example
                labels = labels.to(dev)
                sums.index_add_(0, labels, feats)
                counts += torch.bincount(labels, minlength=classes)[:classes]
    finally:
        bypass.remove()
    if rank_world()[1] > 1:
        all_reduce_sum(sums)
        all_reduce_sum(counts)
    present = counts > 0
    if int(present.sum()) < 2:
        return None
    overall = sums.sum(0) / counts.sum()
    rows = torch.zeros_like(sums)
    rows[present] = sums[present] / counts[present, None] - overall
    return rows if bool(rows.norm() > 0) else None


__all__ = ["HEADS", "HEAD_NAMES", "centroid_head", "head_modules", "output_layer"]
