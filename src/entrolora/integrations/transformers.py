"""Hugging Face ``Trainer`` integration: adapter-only checkpoints at the Trainer's save steps.

    model = el.apply(model, plan)
    trainer = Trainer(model, args, ..., callbacks=[EntroloraCallback()])

At every save step the callback writes ``<output_dir>/checkpoint-<step>/adapter/``
(``adapter.safetensors`` + ``plan.json`` [+ ``flex_state.json``], see ``entrolora.io.save``),
which ``el.load(base_model, dir)`` or ``el.export_peft`` turn back into a model or a peft
checkpoint. The Trainer still writes its own checkpoint files (optimizer, scheduler, RNG and, as
for any plain ``nn.Module``, the full model weights, which resuming needs); pass
``drop_model_weights=True`` to delete those weights and keep only the adapter (then
``trainer.train(resume_from_checkpoint=...)`` cannot resume: use it for runs that never resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..io import save
from ..inject import adapted_modules

ADAPTER_DIR = "adapter"
MODEL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class EntroloraCallback(TrainerCallback):
    """Saves ``el.save(model, <checkpoint>/adapter, flex=flex)`` on every Trainer save (process 0).

    ``flex``: a FlexLoRA controller whose state is saved alongside (``flex_state.json``).
    ``drop_model_weights``: delete the Trainer's full-model weight files from the checkpoint.
    """

    def __init__(self, flex: Any = None, drop_model_weights: bool = False) -> None:
        self.flex = flex
        self.drop_model_weights = drop_model_weights
        self.saved: list[Path] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None and not adapted_modules(model):
            raise ValueError(
                "EntroloraCallback: the Trainer's model has no entrolora adapters; "
                "el.apply(model, plan) before building the Trainer"
            )

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is None or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.saved.append(save(model, checkpoint / ADAPTER_DIR, flex=self.flex))
        if self.drop_model_weights:
            for name in MODEL_WEIGHT_FILES:
                (checkpoint / name).unlink(missing_ok=True)
