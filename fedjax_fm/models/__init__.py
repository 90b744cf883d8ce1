"""Models (NNX) and tasks for federated fine-tuning.

Hugging Face checkpoint loading and export live in the top-level ``hf``
package, which builds on this one.
"""

from fedjax_fm.models import layers
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.decoder import KVCache
from fedjax_fm.models.decoder import ROPE_TYPES
from fedjax_fm.models.decoder import RopeScaling
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig
from fedjax_fm.models.gpt2 import GPT2
from fedjax_fm.models.gpt2 import GPT2Config
from fedjax_fm.models.generate import Generation
from fedjax_fm.models.generate import generate
from fedjax_fm.models.generate import make_generate_fn
from fedjax_fm.models.generate import select_tokens
from fedjax_fm.models.generate import top_p_filter
from fedjax_fm.models.mlp import MLPClassifier
from fedjax_fm.models.tasks import Task
from fedjax_fm.models.tasks import causal_lm_task
from fedjax_fm.models.tasks import classification_task
from fedjax_fm.models.tasks import features_classification_task
from fedjax_fm.models.tasks import make_eval_fn
from fedjax_fm.models.tasks import make_loss_fn

__all__ = [
    'Decoder',
    'DecoderConfig',
    'Encoder',
    'EncoderConfig',
    'GPT2',
    'GPT2Config',
    'Generation',
    'KVCache',
    'MLPClassifier',
    'ROPE_TYPES',
    'RopeScaling',
    'Task',
    'causal_lm_task',
    'classification_task',
    'features_classification_task',
    'generate',
    'layers',
    'make_eval_fn',
    'make_generate_fn',
    'make_loss_fn',
    'select_tokens',
    'top_p_filter',
]
