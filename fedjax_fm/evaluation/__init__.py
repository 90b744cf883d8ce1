"""Evaluation: metrics, held-out splits, per-client federated evaluation, personalisation."""

from fedjax_fm.evaluation.federated import client_eval_batches
from fedjax_fm.evaluation.federated import client_metric_sums
from fedjax_fm.evaluation.federated import distribution
from fedjax_fm.evaluation.federated import finalize_client_sums
from fedjax_fm.evaluation.federated import higher_is_better
from fedjax_fm.evaluation.federated import num_eval_batches
from fedjax_fm.evaluation.federated import per_client_eval
from fedjax_fm.evaluation.federated import split_clients
from fedjax_fm.evaluation.federated import summarize
from fedjax_fm.evaluation.heldout import HeldOut
from fedjax_fm.evaluation.heldout import heldout_split
from fedjax_fm.evaluation.metrics import EM_NORMALIZATIONS
from fedjax_fm.evaluation.metrics import RougeScore
from fedjax_fm.evaluation.metrics import accuracy
from fedjax_fm.evaluation.metrics import aggregate_generative
from fedjax_fm.evaluation.metrics import char_error_rate
from fedjax_fm.evaluation.metrics import edit_distance
from fedjax_fm.evaluation.metrics import exact_match
from fedjax_fm.evaluation.metrics import generative_metrics
from fedjax_fm.evaluation.metrics import generative_scores
from fedjax_fm.evaluation.metrics import lcs_length
from fedjax_fm.evaluation.metrics import masked_mean
from fedjax_fm.evaluation.metrics import mean_loss
from fedjax_fm.evaluation.metrics import normalize_answer
from fedjax_fm.evaluation.metrics import perplexity
from fedjax_fm.evaluation.metrics import perplexity_from_sums
from fedjax_fm.evaluation.metrics import rouge_l
from fedjax_fm.evaluation.metrics import rouge_l_score
from fedjax_fm.evaluation.metrics import rouge_tokenize
from fedjax_fm.evaluation.metrics import token_error_rate
from fedjax_fm.evaluation.metrics import token_f1
from fedjax_fm.evaluation.personalize import personalize

__all__ = [
    'EM_NORMALIZATIONS',
    'HeldOut',
    'RougeScore',
    'accuracy',
    'aggregate_generative',
    'char_error_rate',
    'client_eval_batches',
    'client_metric_sums',
    'distribution',
    'edit_distance',
    'exact_match',
    'finalize_client_sums',
    'generative_metrics',
    'generative_scores',
    'heldout_split',
    'higher_is_better',
    'lcs_length',
    'masked_mean',
    'mean_loss',
    'normalize_answer',
    'num_eval_batches',
    'per_client_eval',
    'perplexity',
    'perplexity_from_sums',
    'personalize',
    'rouge_l',
    'rouge_l_score',
    'rouge_tokenize',
    'split_clients',
    'summarize',
    'token_error_rate',
    'token_f1',
]
