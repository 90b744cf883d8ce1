"""Parameter-efficient fine-tuning: LoRA and trainable/frozen splits."""

from fedjax_fm.peft.lora import LoRALinear
from fedjax_fm.peft.lora import apply_lora
from fedjax_fm.peft.lora import linear_apply
from fedjax_fm.peft.lora import linear_paths
from fedjax_fm.peft.split import METHODS
from fedjax_fm.peft.split import Split
from fedjax_fm.peft.split import count_params
from fedjax_fm.peft.split import merge
from fedjax_fm.peft.split import split_model
from fedjax_fm.peft.split import tree_bytes

__all__ = [
    'LoRALinear',
    'METHODS',
    'Split',
    'apply_lora',
    'count_params',
    'linear_apply',
    'linear_paths',
    'merge',
    'split_model',
    'tree_bytes',
]
