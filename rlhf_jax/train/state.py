"""Train state and the one jitted, sharded train step every stage uses.

A stage supplies `loss_fn(model, batch) -> (loss, metrics)`; `make_train_step` turns it
into the pure function `step(state, batch) -> (state, metrics)`, compiled once with
explicit in/out shardings and the old state donated (its buffers are reused in place).
"""

from __future__ import annotations

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


def make_train_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh | None = None, shardings: TrainState | None = None,
                    batch_shardings=None):
  """Jitted `step(state, batch) -> (state, metrics)`; metrics include `loss` and `grad_norm`."""

  def step(state: TrainState, batch):
    def objective(params):
      return loss_fn(nnx.merge(graphdef, params), batch)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  jitted = jax.jit(step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)

  def run(state, batch):
    with sharding.use_mesh(mesh):
      return jitted(state, batch)

  run.jitted = jitted
  return run
