"""Shared pieces of the tests that run the experiment binary's loop."""

import os

import jax

from fedjax_fm import checkpoint


def saved_states(root, names, like, step: int) -> list:
  """The server state each run ``root/<name>`` checkpointed at ``step``.

  Restored into the structure of ``like``; PRNG keys as raw key data, so that
  `fedjax_fm.checkpoint.tree_equal` compares them bit for bit.
  """
  states = []
  for name in names:
    ck = checkpoint.Checkpointer(os.path.join(str(root), name, 'checkpoints'))
    state, _ = ck.restore(like, step=step)
    ck.close()
    states.append(state._replace(key=jax.random.key_data(state.key)))
  return states
