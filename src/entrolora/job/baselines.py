"""The peft baselines, built with peft itself: peft-lora, dora, adalora, vera, lora-plus, and the
data-initialised peers eva (activation SVD), lora-ga (gradient SVD) and pissa (weight SVD).

PiSSA and LoRA-GA subtract their initial ``B₀A₀`` from the base weights: the trained adapter
only means something on that residual base. Their initial adapter is kept (``Initial``) so that
the run's peft export is peft's conversion to a plain LoRA of rank 2r on the original base
(``save_pretrained(..., path_initial_model_for_weight_conversion=...)``)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PEFT_CALIBRATED, PEFT_OPTIONS, PEFT_RESIDUAL, TrainConfig

Batches = Callable[[], Sequence[Mapping[str, torch.Tensor]]]


def build_peft(
    model: nn.Module,
    method: str,
    targets: list[str],
    cfg: TrainConfig,
    total: int,
    batches: Batches | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(peft model, options with defaults)`` for a peft baseline over ``targets``.

    ``batches()`` gives the calibration batches (on the model's device) that EVA and LoRA-GA
    read; ValueError when one of them gets none. PiSSA and LoRA-GA models carry their initial
    adapter (``initial_adapter``) for the export's conversion.
    """
    import peft

    task_type = "SEQ_CLS" if cfg.task == "classify" else "CAUSAL_LM"
    opts = {**PEFT_OPTIONS[method], **cfg.options}
    common = {"target_modules": targets, "task_type": task_type}
    if method in PEFT_CALIBRATED and batches is None:
        raise ValueError(f"{method} initialises from calibration batches; none were given")
    if method in ("eva", "lora-ga", "pissa"):
        return _data_initialised(peft, model, method, cfg, opts, common, batches), opts
    if method in ("peft-lora", "dora", "lora-plus"):
        config = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=opts["lora_alpha"],
            lora_dropout=cfg.dropout,
            use_dora=method == "dora",
            **common,
        )
    elif method == "adalora":
        config = _adalora_config(peft, cfg, opts, total, common)
    else:
        config = peft.VeraConfig(
            r=cfg.r, d_initial=opts["d_initial"], vera_dropout=cfg.dropout, **common
        )
    return peft.get_peft_model(model, config), opts


def _adalora_config(peft: Any, cfg: TrainConfig, opts: Mapping[str, Any], total: int, common):
    # AdaLoRA's budget schedule needs tinit + tfinal < total; short runs drop both phases
    tinit = opts["tinit"] if opts["tinit"] is not None else total // 10
    tfinal = opts["tfinal"] if opts["tfinal"] is not None else total // 10
    if total - tinit - tfinal < 1:
        tinit = tfinal = 0
    delta = opts["deltaT"] or max(1, (total - tinit - tfinal) // 10)
    return peft.AdaLoraConfig(
        init_r=opts["init_r"] or max(cfg.r + 1, (3 * cfg.r) // 2),
        target_r=cfg.r,
        lora_alpha=opts["lora_alpha"],
        total_step=total,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta,
        lora_dropout=cfg.dropout,
        **common,
    )


def loraplus_optimizer(model: nn.Module, cfg: TrainConfig, opts: Mapping[str, Any]):
    """LoRA+'s AdamW (B's learning rate ``loraplus_lr_ratio`` × A's), from peft."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model=model,
        optimizer_cls=torch.optim.AdamW,
        lr=cfg.lr,
        loraplus_lr_ratio=float(opts["loraplus_lr_ratio"]),
        weight_decay=cfg.weight_decay,
    )


def _data_initialised(
    peft: Any,
    model: nn.Module,
    method: str,
    cfg: TrainConfig,
    opts: Mapping[str, Any],
    common: dict,
    batches: Batches | None,
) -> nn.Module:
    """EVA, LoRA-GA or PiSSA at rank ``cfg.r``, initialised as peft's docs do it."""
    lora = {"r": cfg.r, "lora_alpha": opts["lora_alpha"], "lora_dropout": cfg.dropout, **common}
    if method == "pissa":
        niter = opts["niter"]
        init = "pissa" if niter is None else f"pissa_niter_{int(niter)}"
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=init, **lora))
    elif method == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        eva = peft.EvaConfig(rho=float(opts["rho"]), tau=float(opts["tau"]))
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights="eva", eva_config=eva,
                                                        **lora))  # fmt: skip
        # classification labels are one per row, not per token: EVA's token mask must not see
        # them (it masks positions whose label is -100; the answer-only labels of a causal LM
        # are such a mask)
        drop = ("labels",) if cfg.task == "classify" else ()
        data = [{k: v for k, v in b.items() if k not in drop} for b in batches()]
        initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    else:
        from peft.tuners.lora.loraga import preprocess_loraga

        ga = peft.LoraGAConfig(direction=opts["direction"], scale=opts["scale"],
                               stable_gamma=int(opts["stable_gamma"]))  # fmt: skip
        config = peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=ga, **lora)
        data = list(batches())

        def train_step() -> None:  # gradients summed here, averaged by peft over the calls
            for b in data:
                model(**b).loss.backward()

        preprocess_loraga(model, config, train_step)
        pm = peft.get_peft_model(model, config)
    if method in PEFT_RESIDUAL:
        pm.initial_adapter = save_initial(pm)
    return pm


def save_initial(pm: nn.Module) -> tempfile.TemporaryDirectory:
    """The initial adapter of a PiSSA / LoRA-GA model, saved as peft's conversion reads it
    (``init_lora_weights=True``, in a folder named ``initial``); removed with the object."""
    tmp = tempfile.TemporaryDirectory(prefix="entrolora-initial-")
    config = pm.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        pm.save_pretrained(str(Path(tmp.name) / "initial"))
    finally:
        config.init_lora_weights = init
    return tmp


def save_peft(pm: nn.Module, folder: Path) -> None:
    """peft's ``save_pretrained``; PiSSA and LoRA-GA converted to a LoRA (rank 2r) of the
    original base weights, so that the checkpoint loads onto the unmodified model."""
    initial = getattr(pm, "initial_adapter", None)
    if initial is None:
        pm.save_pretrained(str(folder))
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    pm.save_pretrained(
        str(folder), path_initial_model_for_weight_conversion=str(Path(initial.name) / "initial")
    )
    # peft 0.21's conversion keeps only the lora_A/lora_B tensors: put the rest (the trained
    # classifier head under modules_to_save) back, unchanged
    path = folder / "adapter_model.safetensors"
    saved = load_file(str(path))
    kept = {k: v for k, v in get_peft_model_state_dict(pm).items() if "lora_" not in k}
    missing = {k: v.detach().cpu().contiguous() for k, v in kept.items() if k not in saved}
    if missing:
        save_file({**saved, **missing}, str(path), metadata={"format": "pt"})
