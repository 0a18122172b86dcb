"""Train state and the one jitted, sharded train step every stage uses.

A stage supplies `loss_fn(model, batch) -> (loss, metrics)`; `make_train_step` turns it
into the pure function `step(state, batch) -> (state, metrics)`, compiled once with
explicit in/out shardings and the old state donated (its buffers are reused in place).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of the trained network
  opt_state: Any


def state_shardings(params_shardings, tx: optax.GradientTransformation, abstract_params,
                    mesh: Mesh) -> TrainState:
  """Shardings of a whole TrainState: optimizer moments follow their parameter."""
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), params_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(step=replicated, params=params_shardings, opt_state=opt_shardings)


def create_train_state(params, tx: optax.GradientTransformation, mesh: Mesh | None = None):
  """(state, shardings). With a mesh, optimizer state is created in place on the mesh."""
  if mesh is None:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), None
  params_sh = jax.tree.map(lambda x: x.sharding, params)
  shardings = state_shardings(params_sh, tx, jax.eval_shape(lambda p: p, params), mesh)
  init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                 out_shardings=shardings)
  return init(params), shardings


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
                    batch_shardings=None, grad_accum_steps: int = 1) -> "TrainStep":
  """Jitted `step(state, batch) -> (state, metrics)`; metrics include `loss` and `grad_norm`.

  `grad_accum_steps` = k > 1 splits the batch into k micro-batches, runs forward/backward on
  one at a time inside the same program (`lax.scan`, so activations of one micro-batch are
  live at once) and applies one optimizer update with the mean gradient. Losses and metrics
  are means over micro-batches: for token-averaged losses that is the mean of per-micro-batch
  means (as in TRL/accelerate), not the token mean of the whole batch.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"optim.grad_accum_steps must be >= 1, got {grad_accum_steps}.")

  def grads_and_metrics(params, batch):
    def objective(p):
      return loss_fn(nnx.merge(graphdef, p), batch)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, dict(metrics, loss=loss)

  def accumulated(params, batch):
    def body(acc, micro):
      grads, metrics = grads_and_metrics(params, micro)
      return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    micro = _micro_batches(batch, grad_accum_steps)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grads_and_metrics, params, jax.tree.map(lambda x: x[0], micro)))
    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / grad_accum_steps, total)

  def step(state: TrainState, batch):
    if grad_accum_steps == 1:
      grads, metrics = grads_and_metrics(state.params, batch)
    else:
      grads, metrics = accumulated(state.params, batch)
    loss = metrics.pop("loss")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics

  if mesh is None:
    return TrainStep(jax.jit(step, donate_argnums=0), None)
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
  return TrainStep(jitted, mesh)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """`step(state, batch) -> (state, metrics)`: the compiled step (`jitted`, for cost analysis
  and HLO dumps), called under its mesh and logical-axis rules."""
  jitted: Callable
  mesh: Mesh | None

  def __call__(self, state, batch):
    if self.mesh is None:
      return self.jitted(state, batch)
    with sharding.use_mesh(self.mesh):
      return self.jitted(state, batch)
