"""Orbax checkpoints of the whole server state, written atomically.

Saved: every field of the `ServerState` (trainable params, server optimizer
state, the per-client store, the PRNG key as raw key data, the round counter,
and the state of optional parts: adaptive clip, downlink view, pruning masks,
the merged base update of LoRA ``stack``, SCAFFOLD's server control variate
``control``; the client variates are in ``client_store['scaffold']``), and a small JSON of host-side
extras (e.g. the privacy accountant's rounds). Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save never
leaves a checkpoint that restores half-written; `latest_round` only sees
finished steps.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_fm.engine.round import ServerState


def _to_saveable(state: ServerState) -> dict:
  tree = state._asdict()
  tree['key'] = jax.random.key_data(state.key)   # typed keys are saved as their raw data
  return tree


def _from_saveable(tree: dict, like: ServerState) -> ServerState:
  tree = dict(tree)
  tree['key'] = jax.random.wrap_key_data(tree['key'], impl=jax.random.key_impl(like.key))
  return ServerState(**tree)


class Checkpointer:
  """Saves and restores `ServerState` under ``directory`` every ``every`` rounds.

  Args:
    directory: where the numbered step directories go.
    every: save when ``round % every == 0`` (0 disables periodic saves).
    keep: how many most recent checkpoints to keep.
  """

  def __init__(self, directory: str, every: int = 10, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'extras'))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, state: ServerState, extras: dict | None = None,
                 force: bool = False) -> bool:
    rnd = int(state.round)
    if not force and (not self.every or rnd % self.every):
      return False
    if rnd in self._manager.all_steps():
      return False
    self._manager.save(rnd, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        extras=ocp.args.JsonSave(extras or {})))
    self._manager.wait_until_finished()
    return True

  def restore(self, like: ServerState, step: int | None = None) -> tuple[ServerState, dict]:
    """Restores the given (default: latest) step into the structure of ``like``."""
    step = self.latest_round() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        extras=ocp.args.JsonRestore()))
    return _from_saveable(restored['state'], like), dict(restored['extras'] or {})

  def close(self):
    self._manager.close()


def tree_equal(a: Any, b: Any) -> bool:
  """Bitwise equality of two pytrees of arrays."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
