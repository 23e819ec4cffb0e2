"""Hugging Face ``Trainer`` integration: adapter-only checkpoints at the Trainer's save steps.

    model = el.apply(model, plan)
    trainer = Trainer(model, args, ..., callbacks=[EntroloraCallback()])

At every save step the callback writes ``<output_dir>/checkpoint-<step>/adapter/``
(``adapter.safetensors`` + ``plan.json`` [+ ``flex_state.json``], see ``entrolora.export.io.save``),
which ``el.load(base_model, dir)`` or ``el.export_peft`` turn back into a model or a peft
checkpoint, and tells the Trainer not to write its own checkpoint: the Trainer would save the
whole model, and ``save_pretrained`` refuses shared adapter tensors. Optimizer and scheduler
state are therefore not saved (``resume_from_checkpoint`` is not available);
``save_total_limit`` is honoured. With ``trainer_checkpoints=True`` the Trainer saves its full
checkpoint as usual (only for plans without shared factors) and the adapter is added to it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapters.inject import adapted_modules
from ..export.io import save

ADAPTER_DIR = "adapter"


class EntroloraCallback(TrainerCallback):
    """Saves ``el.save(model, <checkpoint>/adapter, flex=flex)`` at the Trainer's save steps.

    ``flex``: a FlexLoRA controller whose state is saved alongside (``flex_state.json``).
    ``trainer_checkpoints``: also let the Trainer write its own full checkpoint (see module doc).
    Only the main process writes.
    """

    def __init__(self, flex: Any = None, trainer_checkpoints: bool = False) -> None:
        self.flex = flex
        self.trainer_checkpoints = trainer_checkpoints
        self.saved: list[Path] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None and not adapted_modules(model):
            raise ValueError(
                "EntroloraCallback: the Trainer's model has no entrolora adapters; "
                "el.apply(model, plan) before building the Trainer"
            )
        if not self.trainer_checkpoints and getattr(args, "load_best_model_at_end", False):
            raise ValueError(
                "EntroloraCallback saves adapter-only checkpoints, but load_best_model_at_end "
                "needs the Trainer's own checkpoints; pass trainer_checkpoints=True (plans "
                "without shared factors) or turn load_best_model_at_end off"
            )

    def _save(self, args: Any, state: Any, model: Any) -> None:
        if model is None or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.saved.append(save(model, checkpoint / ADAPTER_DIR, flex=self.flex).parent)
        limit = getattr(args, "save_total_limit", None)
        if not self.trainer_checkpoints and limit:
            while len(self.saved) > limit:
                shutil.rmtree(self.saved.pop(0), ignore_errors=True)

    def _intercept(self, args: Any, state: Any, control: Any, model: Any) -> Any:
        # Runs after DefaultFlowCallback has decided to save: write the adapter, skip the
        # Trainer's own whole-model checkpoint.
        if control.should_save and not self.trainer_checkpoints:
            self._save(args, state, model)
            control.should_save = False
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        return self._intercept(args, state, control, model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        return self._intercept(args, state, control, model)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if self.trainer_checkpoints:
            self._save(args, state, model)
