"""Parameter-efficient fine-tuning: LoRA and trainable/frozen splits.

Hugging Face PEFT adapter export lives in the top-level ``hf`` package
(``hf.export_lora_adapter``), which builds on this one.
"""

from fedjax_fm.peft import hetlora
from fedjax_fm.peft import lora_aggregation
from fedjax_fm.peft import qbase
from fedjax_fm.peft import slora
from fedjax_fm.peft import surgery
from fedjax_fm.peft.adapters import AdapterLinear
from fedjax_fm.peft.adapters import AdapterParam
from fedjax_fm.peft.adapters import apply_adapters
from fedjax_fm.peft.ia3 import IA3Linear
from fedjax_fm.peft.ia3 import IA3Param
from fedjax_fm.peft.ia3 import apply_ia3
from fedjax_fm.peft.lora_aggregation import freeze_lora_a
from fedjax_fm.peft.lora_aggregation import lora_aggregator
from fedjax_fm.peft.lora import LoRALinear
from fedjax_fm.peft.lora import apply_lora
from fedjax_fm.peft.lora import linear_paths
from fedjax_fm.peft.prompt import PrefixKV
from fedjax_fm.peft.qbase import QuantizedLinear
from fedjax_fm.peft.qbase import QuantizedTensor
from fedjax_fm.peft.qbase import quantize_base
from fedjax_fm.peft.prompt import PrefixParam
from fedjax_fm.peft.prompt import PromptParam
from fedjax_fm.peft.prompt import SoftPrompt
from fedjax_fm.peft.prompt import apply_prefix_tuning
from fedjax_fm.peft.prompt import apply_prompt_tuning
from fedjax_fm.peft.split import METHODS
from fedjax_fm.peft.split import Split
from fedjax_fm.peft.split import count_params
from fedjax_fm.peft.split import merge
from fedjax_fm.peft.split import split_model
from fedjax_fm.peft.split import tree_bytes

__all__ = [
    'AdapterLinear',
    'AdapterParam',
    'IA3Linear',
    'IA3Param',
    'apply_adapters',
    'apply_ia3',
    'freeze_lora_a',
    'hetlora',
    'lora_aggregation',
    'lora_aggregator',
    'slora',
    'surgery',
    'LoRALinear',
    'METHODS',
    'PrefixKV',
    'PrefixParam',
    'PromptParam',
    'QuantizedLinear',
    'QuantizedTensor',
    'SoftPrompt',
    'apply_prefix_tuning',
    'apply_prompt_tuning',
    'Split',
    'apply_lora',
    'count_params',
    'linear_paths',
    'merge',
    'qbase',
    'quantize_base',
    'split_model',
    'tree_bytes',
]
