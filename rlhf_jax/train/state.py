"""Train state and the one jitted, sharded train step every stage uses.

A stage supplies `loss_fn(model, batch) -> (loss, metrics)`; `make_train_step` turns it
into the pure function `step(state, batch) -> (state, metrics)`, compiled once with
explicit in/out shardings and the old state donated (its buffers are reused in place).

A state may train only part of its network (`trainable`, an nnx filter: LoRA trains its
adapters and scalar heads, `models/lora.py`). The other parameters are frozen: no gradient,
no optimizer state, not in checkpoints, and never donated, so they can be the very arrays of
another network (the RL reference policy) without a copy. `state.params` always holds the
whole network; the compiled step sees the trained part as its state and the frozen part as
a separate, read-only argument.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import sharding
from rlhf_jax.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the network (trained and frozen parts)
  opt_state: Any  # of the trained part only
  # nnx filter of the trained parameters; None: all of them.
  trainable: Any = flax.struct.field(pytree_node=False, default=None)

  def split_params(self):
    """(trained, frozen) parts of `params`; frozen is empty when everything trains."""
    if self.trainable is None:
      return self.params, nnx.State({})
    return nnx.split_state(self.params, self.trainable, ...)

  def trained(self) -> "TrainState":
    """This state with only the trained parameters (what the compiled step carries, and
    what checkpoints hold)."""
    return self.replace(params=self.split_params()[0])

  def with_trained(self, trained_params) -> "TrainState":
    """This state's frozen parameters joined with `trained_params`."""
    if self.trainable is None:
      return self.replace(params=trained_params)
    return self.replace(params=nnx.merge_state(trained_params, self.split_params()[1]))


def state_shardings(params_shardings, tx: optax.GradientTransformation, abstract_params,
                    mesh: Mesh, trainable=None) -> TrainState:
  """Shardings of a TrainState of (trained) parameters: optimizer moments follow their
  parameter."""
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), params_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings,
                    trainable=trainable)


def create_train_state(params, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                       trainable=None):
  """(state, shardings of its trained part). With a mesh, optimizer state is created in place
  on the mesh, and the trained parameters are copied (donating the state never frees the
  arrays it started from); frozen parameters are kept as they are (not copied)."""
  state = TrainState(jnp.zeros((), jnp.int32), params, None, trainable)
  trained, _ = state.split_params()
  if mesh is None:
    return state.replace(opt_state=tx.init(trained)), None
  params_sh = jax.tree.map(lambda x: x.sharding, trained)
  shardings = state_shardings(params_sh, tx, jax.eval_shape(lambda p: p, trained), mesh,
                              trainable)
  init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), trainable),
                 out_shardings=shardings)
  return _joined(init(trained), state), shardings


def create_from(params, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                trainable=None):
  """`create_train_state` of a network that starts as `params`, which stay usable afterwards
  (an RL stage's reference policy): the trained parameters are copied first (the step
  donates them), the frozen ones shared."""
  state = TrainState(jnp.zeros((), jnp.int32), params, None, trainable)
  trained = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(state.split_params()[0])
  return create_train_state(state.with_trained(trained).params, tx, mesh, trainable)


def _joined(trained_state: TrainState, like: TrainState) -> TrainState:
  """`trained_state` (trained parameters only) with `like`'s frozen parameters."""
  return like.with_trained(trained_state.params).replace(step=trained_state.step,
                                                         opt_state=trained_state.opt_state)


def _micro_batches(batch, k: int):
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...

  Strided rather than contiguous so that each device's rows of a batch sharded over its
  first axis split into k local micro-batches: no data moves between devices.
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not divide into optim.grad_accum_steps="
                       f"{k} micro-batches; choose a divisor of the (mini)batch size.")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh | None = None, shardings: TrainState | None = None,
                    batch_shardings=None, grad_accum_steps: int = 1,
                    dropout_seed: int | None = None) -> "TrainStep":
  """Jitted `step(state, batch) -> (state, metrics)`; metrics include `loss` and `grad_norm`.

  `grad_accum_steps` = k > 1 splits the batch into k micro-batches, runs forward/backward on
  one at a time inside the same program (`lax.scan`, so activations of one micro-batch are
  live at once) and applies one optimizer update with the mean gradient. Losses and metrics
  are means over micro-batches: for token-averaged losses that is the mean of per-micro-batch
  means (as in TRL/accelerate), not the token mean of the whole batch.
  `shardings`: of the state's trained part (`create_train_state`'s). `dropout_seed`: the
  network has dropout (LoRA's), switched on in this step only, with keys drawn from the seed,
  the step and the micro-batch (so a resumed run drops exactly what an uninterrupted one
  would).
  """
  if grad_accum_steps < 1:
    raise ValueError(f"optim.grad_accum_steps must be >= 1, got {grad_accum_steps}.")

  def grads_and_metrics(params, frozen, batch, key):
    if key is not None:
      frozen = _reseeded(frozen, key)

    def objective(p):
      model = nnx.merge(graphdef, p, frozen)
      if key is not None:
        model.train()  # dropout on (MoE layers are in train mode in a train step anyway)
      return loss_fn(model, batch)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, dict(metrics, loss=loss)

  def accumulated(params, frozen, batch, key):
    def body(acc, xs):
      micro, j = xs
      grads, metrics = grads_and_metrics(params, frozen, micro,
                                         None if key is None else jax.random.fold_in(key, j))
      return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    micro = _micro_batches(batch, grad_accum_steps)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grads_and_metrics, params, frozen, jax.tree.map(lambda x: x[0], micro), key))
    total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
    return jax.tree.map(lambda x: x / grad_accum_steps, total)

  def step(state: TrainState, batch, frozen):
    key = (None if dropout_seed is None
           else jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step))
    if grad_accum_steps == 1:
      grads, metrics = grads_and_metrics(state.params, frozen, batch, key)
    else:
      grads, metrics = accumulated(state.params, frozen, batch, key)
    loss = metrics.pop("loss")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  if mesh is None:
    return TrainStep(jax.jit(step, donate_argnums=0), None)
  # The frozen parameters keep their own placement (None) and are never donated.
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings, None),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
  return TrainStep(jitted, mesh)


def _reseeded(frozen, key):
  """`frozen` with every adapter's dropout key set from `key` and the adapter's path (modules
  of the same shape must not draw the same mask), split to the key's shape (stacked
  layers)."""
  def one(path, var):
    if not isinstance(var, lora.DropoutKey):
      return var
    k = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
    return var.replace(value=jax.random.split(k, var.shape) if var.shape else k)
  return nnx.from_flat_state([(p, one(p, v)) for p, v in nnx.to_flat_state(frozen)])


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """`step(state, batch) -> (state, metrics)`, called under its mesh and logical-axis rules.
  `jitted` is the compiled `(trained state, batch, frozen params) -> (trained state,
  metrics)` (`args` gives its arguments, for cost analysis and HLO dumps)."""
  jitted: Callable
  mesh: Mesh | None

  @staticmethod
  def args(state: TrainState, batch) -> tuple:
    return state.trained(), batch, state.split_params()[1]

  def __call__(self, state: TrainState, batch):
    args = self.args(state, batch)
    if self.mesh is None:
      new, metrics = self.jitted(*args)
    else:
      with sharding.use_mesh(self.mesh):
        new, metrics = self.jitted(*args)
    return _joined(new, state), metrics
