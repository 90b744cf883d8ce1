"""Shared pieces of the PEFT route tests (adapters, BitFit, IA3)."""

import jax
import numpy as np
import optax
from flax import nnx

from fedjax_fm.models import tasks
from fedjax_fm.models.decoder import DecoderConfig
from fedjax_fm.models.encoder import EncoderConfig

# One set of shapes for all route tests (reuses compiled eager ops).
ENC = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=64, max_position=16, num_labels=4)
DEC = DecoderConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, mlp_dim=64, max_len=16)


def pretrained_like(model, factor=10.0):
  """Scales the N(0, 0.02) matrices up, as trained weights would be."""
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * factor if x.ndim >= 2 else x, state))
  return model


def flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(v) for p, v in leaves}


def train(split, task, batch, steps=30, lr=0.05):
  """``steps`` jitted Adam steps on the split's trainable part; (params, losses)."""
  loss_fn = tasks.make_loss_fn(split.graphdef, task)
  opt = optax.adam(lr)

  @jax.jit
  def run(trainable, frozen):
    def step(carry, _):
      t, s = carry
      loss, g = jax.value_and_grad(lambda t: loss_fn(t, frozen, batch, None).mean())(t)
      u, s = opt.update(g, s, t)
      return (optax.apply_updates(t, u), s), loss

    (t, _), losses = jax.lax.scan(step, (trainable, opt.init(trainable)), None,
                                  length=steps)
    return t, losses

  return run(split.trainable, split.frozen)
