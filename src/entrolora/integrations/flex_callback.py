"""FlexLoRA inside a Hugging Face ``Trainer``: a callback over ``entrolora.FlexLoRA``.

    flex = el.FlexLoRA(model, total_steps=args.max_steps)
    trainer = Trainer(model, args, ..., callbacks=[FlexLoRACallback(flex)])

The Trainer computes its own loss, so the callback adds the regulariser's gradient (analytic,
``FlexLoRA.add_regularizer_grad``: the same code as the regulariser's backward) to P and Q just
before each optimizer step, then lets the controller adjust ranks (``on_pre_optimizer_step``:
after backward and gradient clipping, before ``optimizer.step()``). The controller finds the
torch optimizer inside accelerate's wrapper and hooks its step, so moved slots start like fresh
parameters under Adam/AdamW. The regulariser's gradient is therefore not clipped; with fp16
loss scaling and ``max_grad_norm = 0`` the gradients are still scaled at that point, so keep
gradient clipping on (the default) or add ``flex.regularizer()`` to the loss in your own
``compute_loss`` and pass ``regularize=False``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..flex import FlexLoRA


class FlexLoRACallback(TrainerCallback):
    """Calls ``flex.step(state.global_step, optimizer)`` before every optimizer step.

    ``regularize``: add γ·∇(orthogonality) to the gradients first (METHODS.md §5, revised).
    ``reset_moments=False`` skips the per-slot optimizer reset (optimizers with flat state).
    """

    def __init__(self, flex: FlexLoRA, regularize: bool = True, reset_moments: bool = True):
        if not isinstance(flex, FlexLoRA):
            raise TypeError(
                "FlexLoRACallback needs an entrolora.FlexLoRA controller, got "
                f"{type(flex).__name__}"
            )
        self.flex = flex
        self.regularize = regularize
        self.reset_moments = reset_moments

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.regularize:
            self.flex.add_regularizer_grad()
        # global_step counts finished optimizer steps: it is the 0-based index of this one.
        optimizer = kwargs.get("optimizer") if self.reset_moments else None
        self.flex.step(int(state.global_step), optimizer)
