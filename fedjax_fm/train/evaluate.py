"""Evaluation in a run: held-out metrics, per-client distributions, generation."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm import config as config_lib
from fedjax_fm import data as data_lib
from fedjax_fm import engine
from fedjax_fm import evaluation
from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm import sharding
from fedjax_fm.train import logs


def make_evaluator(split: peft.Split, task: models.Task, eval_arrays, batch_size: int,
                   max_examples: int = 0):
  """``evaluate(trainable) -> {metric: value}`` over the held-out split."""
  eval_fn = models.make_eval_fn(split.graphdef, task)
  n = len(next(iter(eval_arrays.values())))
  if max_examples:
    n = min(n, max_examples)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  padded = num_batches * batch_size
  stacked = {k: np.concatenate([v[:n], np.zeros((padded - n,) + v.shape[1:], v.dtype)])
             .reshape((num_batches, batch_size) + v.shape[1:]) for k, v in eval_arrays.items()}
  mask = (np.arange(padded) < n).reshape(num_batches, batch_size).astype(np.float32)

  @jax.jit
  def run_eval(trainable, frozen, stacked, mask):
    def body(sums, xs):
      batch, m = xs
      out = eval_fn(trainable, frozen, batch)
      return jax.tree.map(lambda s, v: s + jnp.sum(v * m), sums, out), None
    zeros = jax.tree.map(lambda s: jnp.zeros((), jnp.float32),
                         jax.eval_shape(eval_fn, trainable, frozen,
                                        jax.tree.map(lambda v: v[0], stacked)))
    sums, _ = jax.lax.scan(body, zeros, (stacked, mask))
    return sums

  def evaluate(trainable, frozen=None):
    frozen = split.frozen if frozen is None else frozen
    sums = jax.device_get(run_eval(trainable, frozen, stacked, mask))
    out = {}
    if 'num_tokens' in sums:   # causal LM: token-weighted loss and perplexity
      tokens = max(float(sums['num_tokens']), 1.0)
      out['loss'] = float(sums['nll_sum']) / tokens
      out['perplexity'] = float(np.exp(min(out['loss'], 50.0)))
      out['token_accuracy'] = float(sums['correct_tokens']) / tokens
    else:
      out['loss'] = float(sums['loss']) / n
      out['accuracy'] = float(sums['correct']) / n
    return out

  return evaluate



def evaluate_clients(exp, trainable, frozen=None):
  """Per-client evaluation on local test data, and the personalisation baseline."""
  cfg = exp.config
  frozen = exp.split.frozen if frozen is None else frozen
  eval_fn = models.make_eval_fn(exp.split.graphdef, exp.task)
  per_client = evaluation.per_client_eval(eval_fn, trainable, frozen, exp.data.client_test,
                                          batch_size=cfg.fl.batch_size)
  federated = {'per_client': {k: np.asarray(v).tolist() for k, v in per_client.items()},
               'distribution': evaluation.summarize(per_client)}
  personal = None
  if cfg.eval.personalize_steps:
    co = cfg.client_optimizer
    out = evaluation.personalize(
        models.make_loss_fn(exp.split.graphdef, exp.task), eval_fn, trainable, frozen,
        exp.data.train, exp.data.client_test, steps=cfg.eval.personalize_steps,
        batch_size=cfg.fl.batch_size,
        optimizer=engine.client_optimizer(co.name, co.learning_rate, momentum=co.momentum),
        seed=cfg.seed)
    personal = {'after_distribution': out['after_distribution'],
                'after': {k: np.asarray(v).tolist() for k, v in out['after'].items()}}
  return federated, personal


def generate_responses(exp, trainable, frozen=None) -> tuple[list[dict], dict]:
  """Greedy responses to the leading ``data.generate_examples`` held-out instructions.

  Returns:
    ``(records, metrics)``: one ``{'prompt', 'reference', 'prediction',
    'category'}`` record per example (the prompt as rendered by the template),
    and the mean ROUGE-L, exact match and token F1 of the predictions.
  """
  d = exp.config.data
  held = {k: v[:d.generate_examples] for k, v in exp.data.instructions.items()}
  tok = exp.data.tokenizer
  # A pretrained decoder has room for data.max_len prompt tokens and the generated
  # ones (registries.load_pretrained_decoder); a decoder built for the data, for
  # data.max_len tokens in all.
  room = d.max_len if exp.config.model.kind == 'gguf' else d.max_len - d.generate_max_tokens
  if room < 2:
    raise config_lib.ConfigError(
        f'config.data.generate_max_tokens={d.generate_max_tokens} leaves no room for the '
        f'prompt within config.data.max_len={d.max_len}')
  template = exp.data.prompt_template or d.instruction_template
  enc = data_lib.instructions.tokenize_prompts(held, tok, room, template=template)
  frozen = exp.split.frozen if frozen is None else frozen
  eos = exp.data.eos_id
  if eos is None:
    eos = getattr(getattr(tok, 'processor', None), 'eos_id', lambda: None)()
  out = models.generate((exp.split.graphdef, trainable, frozen), enc['input_ids'],
                        d.generate_max_tokens, prompt_mask=enc['attention_mask'],
                        eos_id=eos if eos is not None and eos >= 0 else None)
  ids, lengths = np.asarray(out.ids), np.asarray(out.lengths)
  preds = [tok.decode([int(t) for t in row[:n]]).strip() for row, n in zip(ids, lengths)]
  refs = [str(r) for r in held['output']]
  m = evaluation.generative_metrics(preds, refs)
  prompts = data_lib.format_prompts(held, template)
  categories = held.get('category', [''] * len(preds))
  records = [{'prompt': p, 'reference': r, 'prediction': x, 'category': str(c)}
             for p, r, x, c in zip(prompts, refs, preds, categories)]
  return records, {k: float(v) for k, v in m.items() if k != 'num_examples'}


def evaluate_generation(exp, trainable, frozen=None) -> dict:
  """Greedy responses to held-out instructions, scored by ROUGE-L, EM and token F1."""
  return generate_responses(exp, trainable, frozen)[1]


GENERATIONS_FILE = 'generations.jsonl'


def generation_before_after(exp, trainable, frozen, workdir: str) -> dict:
  """Generation quality of the pretrained model (before) and the trained one (after).

  "Before" generates with the untrained trainable part and the original frozen
  base (``exp.split``; for SLoRA, the start of its LoRA stage), "after" with
  ``trainable`` and ``frozen``. Writes one JSON line per held-out example and
  model into ``workdir/generations.jsonl``: ``{'model': 'before' | 'after',
  'prompt', 'reference', 'prediction', 'category'}`` (process 0 only).

  Returns:
    ``{'generation': after metrics, 'generation_before': before metrics}``.
  """
  before_records, before = generate_responses(exp, exp.split.trainable, exp.split.frozen)
  after_records, after = generate_responses(exp, trainable, frozen)
  if sharding.is_main_process():
    with open(os.path.join(workdir, GENERATIONS_FILE), 'w', encoding='utf-8') as fh:
      for name, records in (('before', before_records), ('after', after_records)):
        for record in records:
          fh.write(json.dumps({'model': name, **record}, ensure_ascii=False) + '\n')
  logs.log(f'generation on {len(after_records)} held-out instructions: '
           f'{logs.fmt_metrics(after)} (before: {logs.fmt_metrics(before)})')
  return {'generation': after, 'generation_before': before}
