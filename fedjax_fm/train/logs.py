"""Logs of a run: console lines, the progress bar, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from fedjax_fm import extras
from fedjax_fm import sharding

logger = logging.getLogger('fedjax_fm')


def fmt_bytes(n: float) -> str:
  """Bytes in binary units (B, KiB, MiB, GiB)."""
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return str(n)


def tensorboard_writer(logdir: str):
  """A TensorBoard event writer, or None (said once) without the ``tensorboard`` extra.

  TensorBoard events are on by default; the core install leaves tensorboardX out,
  so a run without it keeps its metrics.jsonl and says how to get the events.
  """
  try:
    tensorboardx = extras.require('tensorboardX', 'tensorboard', 'config.tensorboard=True')
  except ImportError as e:
    log(f'{e}; writing metrics.jsonl only')
    return None
  return tensorboardx.SummaryWriter(logdir)


def write_tensorboard(writer, record: dict) -> None:
  step = record['round']
  for k in ('train_loss', 'update_norm', 'param_norm', 'round_time_s', 'epsilon', 'sparsity',
            'clip_norm'):
    if k in record:
      writer.add_scalar(f'train/{k}', record[k], step)
  writer.add_scalar('comm/uplink_bytes', record['uplink_bytes'], step)
  writer.add_scalar('comm/cum_uplink_bytes', record['cum_uplink_bytes'], step)
  writer.add_scalar('comm/downlink_bytes', record['downlink_bytes'], step)
  if record.get('client_loss'):
    writer.add_histogram('train/client_loss', np.asarray(record['client_loss']), step)
  for k, v in record.get('eval', {}).items():
    writer.add_scalar(f'eval/{k}', v, step)
  writer.flush()


def keep_records(path: str, upto: int) -> None:
  """Keeps the metrics records of rounds <= upto (drops those of a killed run)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)['round'] <= upto:
        kept.append(line)
    except (json.JSONDecodeError, KeyError):
      break   # a torn last line from a kill mid-write
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def fmt_metrics(m: dict) -> str:
  return ' '.join(f'{k}={v:.4f}' for k, v in m.items())


def progress(it, enabled: bool):
  if not enabled or not sharding.is_main_process():
    return it
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(it, desc='rounds', unit='round', dynamic_ncols=True)


def log(msg: str, bar=None):
  """Logs a line (process 0 prints it, above the progress bar if there is one)."""
  logger.info(msg)
  if not sharding.is_main_process():
    return
  if bar is not None and hasattr(bar, 'write'):
    bar.write(msg)
  else:
    print(msg, flush=True)
