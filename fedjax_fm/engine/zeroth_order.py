"""Zeroth-order federated fine-tuning with K shared seeds: FedKSeed.

FedKSeed (Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes",
https://arxiv.org/abs/2312.06353):

* The server fixes K candidate seeds once for the whole run. Here seed ``k``
  (an integer in ``[0, K)``, the only thing that crosses the network) stands
  for the key ``fold_in(pool_key(run_key), k)``, and its perturbation ``z_k``
  is a standard normal draw of the trainable tree from that key
  (`seed_perturbation`), generated on the device by clients and server alike.
* Each local step a client draws a seed (uniformly; FedKSeed-Pro: with the
  server's probabilities, `seed_probabilities`), estimates the directional
  derivative by two forward passes (`two_point_estimate`),
  ``g = (L(w + eps z) - L(w - eps z)) / (2 eps)``, and steps
  ``w <- w - lr g z``. No backward pass: no gradient, no optimizer state,
  no activations kept for a backward pass; the client holds the params, ``z``
  and a perturbed copy (XLA does not update them in place as MeZO does in
  PyTorch, so a few parameter-sized buffers). It records the pair
  ``(seed, g)``.
* Uplink: the ``S`` pairs of its local steps (``payload='pairs'``: an int16
  index, int32 from K > 32768, and a float32 scalar per step), or the K
  per-seed sums of its scalars (``payload='accumulator'``, K float32). The
  payload arrays' ``nbytes`` are the uplink bytes.
* The server sums the scalars per seed and averages them over the round's
  clients (uniformly, as the paper's server), giving ``a [K]``, and applies
  ``w <- w - lr sum_k a_k z_k`` (`reconstruct`, a scan over at most
  ``min(K, clients x steps)`` seeds). As the local update is linear in the
  scalars, this equals the plain mean of the clients' local models.
* Clients sync by replaying the run's accumulated scalars ``A = sum_r a_r``
  from the initial model: ``w = w_0 - lr sum_k A_k z_k`` (`replay`), so
  the downlink the paper counts is K float32 (``downlink_bytes_per_client``)
  whatever the rounds a client missed. The simulation hands the clients the
  server's params directly, which is the same model.
* FedKSeed-Pro (``probabilities='pro'``): seed ``k`` is drawn with
  probability ``softmax(minmax(psi))_k``, ``psi_k`` the mean amplitude ``|g|``
  of all scalars seed ``k`` received so far (0 if none; uniform before the
  first round).

Choices where the paper leaves room: the seeds are indices folded into the
run key rather than random integers (the same role: a seed names a shared
perturbation); FedKSeed-Pro's amplitudes are not clipped; the aggregation is
uniform over the round's clients.

The server's per-seed statistics live in ``ServerState.opt_state``
(`KSeedState`); there is no server optimizer (FedAvg with rate 1, which the
seed replay requires). Padding clients and masked local steps send ``g = 0``
and change nothing; a client whose scalars are not finite is dropped.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_fm import tree_util
from fedjax_fm.engine import client as client_lib
from fedjax_fm.engine import strategies
from fedjax_fm.engine.round import FederatedRound
from fedjax_fm.engine.round import ServerState
from fedjax_fm.engine.round import client_metrics

PAYLOADS = ('pairs', 'accumulator')
PROBABILITIES = ('uniform', 'pro')
_POOL_TAG = 0xFFFFFFFC   # folded into the run key: the candidate seeds' key


class KSeedState(NamedTuple):
  """The server's per-seed record (``ServerState.opt_state``), each ``[K]`` float32.

  Attributes:
    accumulated: the run's aggregated scalars per seed, ``sum_r a_r``: a client
      rebuilds the global model from them (`replay`).
    abs_sum: the sum of ``|g|`` over every scalar the seed received (FedKSeed-Pro).
    count: how many scalars the seed received.
  """
  accumulated: jax.Array
  abs_sum: jax.Array
  count: jax.Array


# ------------------------------------------------------------ pure functions

def _dtype(x):
  return x.dtype if hasattr(x, 'dtype') else jnp.result_type(x)


def pool_key(run_key: jax.Array) -> jax.Array:
  """The key of the run's K candidate seeds (fixed for the whole run)."""
  return jax.random.fold_in(run_key, _POOL_TAG)


def perturbation(key: jax.Array, params_like: Any) -> Any:
  """``z ~ N(0, I)`` shaped like ``params_like`` (one key per leaf, split from ``key``)."""
  leaves, treedef = jax.tree.flatten(params_like)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, jnp.shape(x), jnp.float32).astype(_dtype(x))
      for k, x in zip(keys, leaves)])


def seed_perturbation(pool: jax.Array, index, params_like: Any) -> Any:
  """The perturbation of candidate seed ``index`` of the pool ``pool`` (`pool_key`)."""
  return perturbation(jax.random.fold_in(pool, index), params_like)


def sample_seed(key: jax.Array, num_seeds: int, probabilities: jax.Array | None = None):
  """One seed index in ``[0, num_seeds)``: uniform, or drawn with ``probabilities [K]``."""
  if probabilities is None:
    return jax.random.randint(key, (), 0, num_seeds, jnp.int32)
  return jax.random.categorical(key, jnp.log(probabilities)).astype(jnp.int32)


def two_point_estimate(loss: Callable[[Any], jax.Array], params: Any, z: Any, eps: float):
  """``((L(w + eps z) - L(w - eps z)) / (2 eps), L(w + eps z), L(w - eps z))``.

  Two forward passes, no gradient; the estimate of ``z . grad L(w)`` is exact
  for a quadratic ``L`` (and ``O(eps^2)`` off otherwise).
  """
  plus = loss(jax.tree.map(lambda w, d: w + eps * d, params, z))
  minus = loss(jax.tree.map(lambda w, d: w - eps * d, params, z))
  plus, minus = jnp.asarray(plus, jnp.float32), jnp.asarray(minus, jnp.float32)
  return (plus - minus) / (2.0 * eps), plus, minus


def reconstruct(pool: jax.Array, indices: jax.Array, coefficients: jax.Array,
                params_like: Any) -> Any:
  """``sum_i coefficients[i] * z_{indices[i]}``: a scan, one perturbation alive at a time."""
  zero = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params_like)

  def body(acc, ic):
    i, c = ic
    z = seed_perturbation(pool, i, params_like)
    return jax.tree.map(lambda a, d: a + c * d.astype(jnp.float32), acc, z), None

  out, _ = jax.lax.scan(body, zero, (jnp.asarray(indices, jnp.int32),
                                     jnp.asarray(coefficients, jnp.float32)))
  return jax.tree.map(lambda o, x: o.astype(_dtype(x)), out, params_like)


def reconstruct_sparse(pool: jax.Array, per_seed: jax.Array, params_like: Any,
                       max_seeds: int) -> Any:
  """`reconstruct` over the nonzero entries of ``per_seed [K]`` (at most ``max_seeds`` of them)."""
  num_seeds = per_seed.shape[0]
  size = int(min(num_seeds, max(max_seeds, 1)))
  if size == num_seeds:
    return reconstruct(pool, jnp.arange(num_seeds), per_seed, params_like)
  (idx,) = jnp.nonzero(per_seed != 0, size=size, fill_value=num_seeds)
  coef = per_seed.at[idx].get(mode='fill', fill_value=0.0)
  return reconstruct(pool, idx, coef, params_like)


def replay(pool: jax.Array, accumulated: jax.Array, initial_params: Any,
           learning_rate: float) -> Any:
  """The model a client rebuilds from the seeds: ``w_0 - lr sum_k A_k z_k``."""
  step = reconstruct(pool, jnp.arange(accumulated.shape[0]), accumulated, initial_params)
  return jax.tree.map(lambda w, d: (w - learning_rate * d).astype(w.dtype),
                      initial_params, step)


def seed_probabilities(abs_sum: jax.Array, count: jax.Array) -> jax.Array:
  """FedKSeed-Pro: ``softmax(minmax(psi))``, ``psi_k = abs_sum_k / count_k`` (0 if unused)."""
  psi = jnp.where(count > 0, abs_sum / jnp.maximum(count, 1.0), 0.0)
  lo, hi = jnp.min(psi), jnp.max(psi)
  return jax.nn.softmax((psi - lo) / (hi - lo + 1e-10))


def index_dtype(num_seeds: int):
  """The smallest signed integer type of a seed index on the wire."""
  return jnp.int16 if num_seeds <= 2**15 else jnp.int32


def encode_payload(indices: jax.Array, scalars: jax.Array, num_seeds: int,
                   payload: str = 'pairs') -> dict:
  """The uplink arrays of one client: its ``(seed, g)`` pairs, or their per-seed sums."""
  if payload == 'pairs':
    return {'index': indices.astype(index_dtype(num_seeds)),
            'scalar': scalars.astype(jnp.float32)}
  if payload == 'accumulator':
    return {'scalar': jnp.zeros((num_seeds,), jnp.float32).at[indices].add(scalars)}
  raise ValueError(f'payload {payload!r} is unknown; allowed: {PAYLOADS}')


def decode_payload(payload_arrays: dict, num_seeds: int) -> jax.Array:
  """The per-seed sums ``[K]`` of a client's scalars (what the server aggregates)."""
  if 'index' in payload_arrays:
    idx = payload_arrays['index'].astype(jnp.int32)
    return jnp.zeros((num_seeds,), jnp.float32).at[idx].add(payload_arrays['scalar'])
  return payload_arrays['scalar']


def payload_nbytes(num_seeds: int, local_steps: int, payload: str = 'pairs') -> int:
  """Uplink bytes of one client per round, from the payload arrays' shapes."""
  shapes = jax.eval_shape(
      lambda: encode_payload(jnp.zeros((local_steps,), jnp.int32),
                             jnp.zeros((local_steps,), jnp.float32), num_seeds, payload))
  return tree_util.tree_nbytes(shapes)


def make_zo_client_update(loss_fn: client_lib.LossFn, *, num_seeds: int, eps: float,
                          learning_rate: float):
  """Builds ``client_update(params, frozen, data, key, pool, probabilities)``.

  Returns ``(indices [S] int32, scalars [S] float32, local_params, metrics)``.
  Step ``s`` draws its seed with ``fold_in(key, s)`` split in two (seed
  choice, loss key; both forward passes share the loss key, so dropout is the
  same). A masked step (``step_mask``) records ``g = 0`` and leaves the params
  as they are. ``probabilities`` is None for uniform sampling.
  """

  def client_update(params, frozen, data, key, pool, probabilities=None):
    steps_data = jax.tree.map(jnp.asarray,
                              (data['batch'], data['example_mask'], data['step_mask']))
    num_steps = data['step_mask'].shape[0]

    def step(carry, s):
      w, loss_sum = carry
      batch, example_mask, step_mask = jax.tree.map(lambda a: a[s], steps_data)
      seed_key, loss_key = jax.random.split(jax.random.fold_in(key, s))
      idx = sample_seed(seed_key, num_seeds, probabilities)
      zkey = jax.random.fold_in(pool, idx)

      def loss(p):
        return client_lib.masked_mean_loss(loss_fn, p, frozen, batch, example_mask, loss_key)

      z = perturbation(zkey, w)
      g, plus, minus = two_point_estimate(loss, w, z, eps)
      g = jnp.where(step_mask, g, 0.0)
      new_w = jax.tree.map(lambda a, d: (a - learning_rate * g * d).astype(a.dtype), w, z)
      w = tree_util.tree_select(step_mask, new_w, w)
      loss_sum = loss_sum + jnp.where(step_mask, 0.5 * (plus + minus), 0.0)
      return (w, loss_sum), (idx, g)

    (local, loss_sum), (indices, scalars) = jax.lax.scan(
        step, (params, jnp.zeros((), jnp.float32)), jnp.arange(num_steps))
    real_steps = jnp.sum(data['step_mask'].astype(jnp.float32))
    metrics = {
        'loss': loss_sum / jnp.maximum(real_steps, 1.0),
        'steps': real_steps,
        'examples': jnp.sum(data['example_mask'].astype(jnp.float32)),
    }
    return indices, scalars, local, metrics

  return client_update


# ------------------------------------------------------------------ the round

def build_fedkseed_round(loss_fn: client_lib.LossFn,
                         params_like: Any,
                         *,
                         num_clients: int,
                         num_seeds: int = 4096,
                         eps: float = 5e-4,
                         learning_rate: float = 1e-4,
                         probabilities: str = 'uniform',
                         payload: str = 'pairs',
                         local_steps: int | None = None,
                         strategy: str = 'chunked',
                         chunk_size: int | str | None = None,
                         mesh=None,
                         donate: bool = False) -> FederatedRound:
  """Builds a FedKSeed round (one ``jax.jit``), run by `fedjax_fm.train` unchanged.

  Args:
    loss_fn: ``loss_fn(trainable, frozen, batch, key) -> per-example loss [B]``.
    params_like: the trainable params (any pytree: LoRA factors or the full model).
    num_clients: clients in the population (kept for the engine's signature;
      FedKSeed keeps no per-client state).
    num_seeds: K, the candidate seeds.
    eps: the perturbation scale of the two-point estimate.
    learning_rate: the local step ``w <- w - lr g z`` (also the replay's).
    probabilities: ``uniform`` (FedKSeed) or ``pro`` (FedKSeed-Pro).
    payload: ``pairs`` (the paper's ``(seed, scalar)`` per step) or
      ``accumulator`` (K per-seed sums); ``pro`` needs ``pairs`` (its
      amplitudes are those of single steps).
    local_steps: steps per client per round, for the uplink bytes (the round
      itself takes them from the data; default: 1, and the bytes metric then
      scales with the data's steps).
    strategy: ``vmap``, ``chunked`` or ``sharded`` (`engine.strategies`).
    chunk_size: clients per vmapped chunk (see `engine.build_round`).
    mesh: a mesh with a ``clients`` axis for ``sharded``.
    donate: donate the server state's buffers to the round.

  Returns:
    A `FederatedRound`: ``uplink_bytes_per_client`` from the payload arrays,
    ``downlink_bytes_per_client`` the K accumulated float32 scalars a client
    replays (the paper's sync).
  """
  del num_clients
  if strategy not in strategies.STRATEGIES:
    raise ValueError(f'strategy {strategy!r} is unknown; allowed: {strategies.STRATEGIES}')
  strategies.resolve_chunk_size(chunk_size, 1, 'cpu')   # validates it
  if probabilities not in PROBABILITIES:
    raise ValueError(f'probabilities {probabilities!r} is unknown; allowed: {PROBABILITIES}')
  if payload not in PAYLOADS:
    raise ValueError(f'payload {payload!r} is unknown; allowed: {PAYLOADS}')
  if probabilities == 'pro' and payload != 'pairs':
    raise ValueError('probabilities="pro" weighs seeds by the amplitude of single-step '
                     'scalars, which only payload="pairs" sends')
  if isinstance(num_seeds, bool) or int(num_seeds) < 1:
    raise ValueError(f'num_seeds={num_seeds!r} must be a positive integer')
  if not eps > 0 or not learning_rate > 0:
    raise ValueError(f'eps={eps!r} and learning_rate={learning_rate!r} must be > 0')
  num_seeds = int(num_seeds)
  pro = probabilities == 'pro'
  client_update = make_zo_client_update(loss_fn, num_seeds=num_seeds, eps=eps,
                                        learning_rate=learning_rate)
  uplink_bytes = payload_nbytes(num_seeds, local_steps or 1, payload)
  downlink_bytes = 4 * num_seeds

  def init(params, key, hparams=None) -> ServerState:
    if hparams:
      raise ValueError('the FedKSeed round takes no hyperparameters from the state')
    zeros = jnp.zeros((num_seeds,), jnp.float32)
    return ServerState(params=params, opt_state=KSeedState(zeros, zeros, zeros),
                       client_store=(), key=key, round=jnp.zeros((), jnp.int32))

  def frozen_view(state, frozen):
    del state
    return frozen

  def per_client(broadcast, frozen, x):
    indices, scalars, local, metrics = client_update(
        broadcast['params'], frozen, x['data'], x['key'], broadcast['pool'],
        broadcast['probabilities'])
    wire = encode_payload(indices, scalars, num_seeds, payload)
    finite = jnp.all(jnp.isfinite(scalars))
    weight = jnp.where(finite, x['weight'], 0.0)
    per_seed = decode_payload(wire, num_seeds)
    contrib = {'sum': jnp.where(weight > 0, weight * per_seed, 0.0)}
    if pro:   # amplitudes of the real steps of the clients that count
      real = x['data']['step_mask'] & (weight > 0)
      contrib['abs_sum'] = jnp.zeros((num_seeds,), jnp.float32).at[indices].add(
          jnp.where(real, jnp.abs(scalars), 0.0))
      contrib['count'] = jnp.zeros((num_seeds,), jnp.float32).at[indices].add(
          real.astype(jnp.float32))
    metrics['finite'] = finite
    metrics['update_norm'] = tree_util.tree_norm(tree_util.tree_sub(local, broadcast['params']))
    return contrib, {'metrics': metrics}

  def reducer():
    zeros = jnp.zeros((num_seeds,), jnp.float32)
    zero = {'sum': zeros}
    if pro:
      zero.update(abs_sum=zeros, count=zeros)

    def accumulate(acc, contribs, broadcast):
      del broadcast
      return {k: acc[k] + jnp.sum(contribs[k], axis=0) for k in acc}

    return strategies.Reducer(zero, accumulate)

  def apply(state: ServerState, frozen, round_data) -> tuple[ServerState, dict]:
    weight = jnp.asarray(round_data['weight'], jnp.float32)
    ids = jnp.asarray(round_data['client_id'], jnp.int32)
    mask = round_data.get('client_mask')
    mask = weight > 0 if mask is None else jnp.asarray(mask, bool)
    fmask = mask.astype(jnp.float32)
    n = jnp.sum(fmask)
    round_key = jax.random.fold_in(state.key, state.round)
    keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)
    pool = pool_key(state.key)
    record: KSeedState = state.opt_state
    probs = seed_probabilities(record.abs_sum, record.count) if pro else None
    xs = {
        'data': {k: round_data[k] for k in ('batch', 'example_mask', 'step_mask')},
        'weight': fmask,   # uniform over the round's clients (the paper's server)
        'key': keys,
    }
    broadcast = {'params': state.params, 'pool': pool, 'probabilities': probs}
    acc, outputs = strategies.run_clients(strategy, per_client, reducer(), broadcast, frozen,
                                          xs, chunk_size=chunk_size, mesh=mesh)
    cm = outputs['metrics']
    counted = mask & cm['finite']
    a = acc['sum'] / jnp.maximum(jnp.sum(counted.astype(jnp.float32)), 1.0)
    max_seeds = weight.shape[0] * round_data['step_mask'].shape[1]
    step = reconstruct_sparse(pool, a, state.params, max_seeds)
    params = jax.tree.map(lambda w, d: (w - learning_rate * d).astype(w.dtype),
                          state.params, step)
    new_record = KSeedState(
        accumulated=record.accumulated + a,
        abs_sum=record.abs_sum + acc['abs_sum'] if pro else record.abs_sum,
        count=record.count + acc['count'] if pro else record.count)
    new_state = state._replace(params=params, opt_state=new_record, round=state.round + 1)

    update_norm = learning_rate * tree_util.tree_norm(step)
    metrics = {
        **client_metrics(cm, mask),
        'uplink_bytes': n * float(payload_nbytes(num_seeds, round_data['step_mask'].shape[1],
                                                 payload)),
        'downlink_bytes': n * float(downlink_bytes),
        'update_norm': update_norm,
        'param_norm': tree_util.tree_norm(params),
        'seeds_used': jnp.sum((a != 0).astype(jnp.float32)),
    }
    if pro:
      metrics['seed_probability_max'] = jnp.max(probs)
    return new_state, metrics

  jitted = jax.jit(apply, donate_argnums=(0,) if donate else ())
  return FederatedRound(init=init, apply=jitted, uplink_bytes_per_client=uplink_bytes,
                        downlink_bytes_per_client=downlink_bytes, apply_fn=apply,
                        frozen_view=frozen_view)


def client_step_memory(client_fn: Callable, *args) -> dict[str, int]:
  """XLA's memory analysis (bytes) of ``jax.jit(client_fn)(*args)``, compiled, not run."""
  compiled = jax.jit(client_fn).lower(*args).compile()
  ma = compiled.memory_analysis()
  return {'temp': int(ma.temp_size_in_bytes), 'argument': int(ma.argument_size_in_bytes),
          'output': int(ma.output_size_in_bytes)}

