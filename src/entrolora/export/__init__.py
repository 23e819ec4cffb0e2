"""What leaves entrolora: adapter checkpoints (``io``: ``save`` / ``load``), stock peft LoRA
checkpoints (``peft``, METHODS.md §6) with their model card (``card``) and record (``record``),
and merged Hugging Face model folders (``merged``).
"""

from .merged import clear_quantization_markers, export_merged
from .peft import export_peft, infer_task_type, portable_base_name, to_peft_config
from .record import LAYOUTS, PeftExport, vllm_max_lora_rank

__all__ = [
    "LAYOUTS", "PeftExport", "clear_quantization_markers", "export_merged", "export_peft",
    "infer_task_type", "portable_base_name", "to_peft_config", "vllm_max_lora_rank",
]  # fmt: skip
