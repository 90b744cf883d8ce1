"""Models (NNX) and tasks for federated fine-tuning."""

from fedjax_fm.models import hf
from fedjax_fm.models.decoder import Decoder
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.encoder import Encoder
from fedjax_fm.models.encoder import EncoderConfig
from fedjax_fm.models.hf import load_bert_into
from fedjax_fm.models.hf import load_minilm_encoder
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
    'MLPClassifier',
    'Task',
    'causal_lm_task',
    'classification_task',
    'features_classification_task',
    'hf',
    'load_bert_into',
    'load_minilm_encoder',
    'make_eval_fn',
    'make_loss_fn',
]
