"""Sharded initialisation without one giant program: the model constructor traced once, its
RNG keys computed eagerly, and each parameter made by a small jitted program carrying its
sharding (`init_programs`, what `sharding.init_sharded` runs).

Why: the single program of the whole constructor took 2 min 22 s to compile on an H200 at
the TinyLlama-1.1B shape (9.6 s on CPU, against 1.4 s for the 8 per-parameter programs here)
and held every parameter's random bits as temporaries (5.9 GiB, against 0.7 GiB);
benchmarks/README.md. The values are bit-identical (same keys, same ops). Uses the
`jax.extend.core` jaxpr API; `init_sharded` falls back to the one program where that API
differs.
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import jax
import numpy as np
from flax import nnx

from rlhf_jax.sharding import LOGICAL_AXIS_RULES, Mesh, param_shardings, use_mesh


def init_programs(create_model: Callable[[], nnx.Module], mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """(graphdef, treedef of the state, [(jitted program, host args)] per state leaf): what
  `init_sharded` runs. The same jitted object appears once per distinct leaf computation;
  `benchmarks/accel.py --aot` lowers and compiles those without allocating the parameters."""
  graphdef, abstract = nnx.split(nnx.eval_shape(create_model))
  shardings = jax.tree.leaves(param_shardings(abstract, mesh, rules))

  def init_leaves():
    return jax.tree.leaves(nnx.split(create_model())[1])

  with use_mesh(mesh, rules):
    closed = jax.make_jaxpr(init_leaves)()
    calls = _per_leaf_programs(closed, shardings)
  return graphdef, jax.tree.structure(abstract), calls


# Integer and key arrays of at most this many elements (RNG keys and counters) are computed
# eagerly while splitting a constructor. Floating-point values are always computed inside
# jitted programs: eager float ops differ from XLA's fused ones in the last bit.
_EAGER_MAX_ELEMENTS = 1 << 16


def _is_cheap(eqn, known: set) -> bool:
  from jax.extend.core import Literal  # pylint: disable=g-import-not-at-top

  def small_int(v) -> bool:
    dtype = getattr(v.aval, "dtype", None)
    return (dtype is not None and not jax.dtypes.issubdtype(dtype, np.inexact) and
            math.prod(v.aval.shape) <= _EAGER_MAX_ELEMENTS)

  return (all(isinstance(v, Literal) or v in known for v in eqn.invars) and
          all(small_int(v) for v in eqn.outvars))


def _jaxpr(constvars, invars, outvars, eqns):
  from jax.extend.core import DebugInfo, Jaxpr  # pylint: disable=g-import-not-at-top
  effects = frozenset().union(*(e.effects for e in eqns))
  info = DebugInfo("init_sharded", "init_sharded", ("",) * len(invars), ("",) * len(outvars))
  return Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), effects=effects,
               debug_info=info)


def _slice(outvar, eqns, known: set):
  """(eqns computing `outvar` from known vars, in order; those known vars, in order of use).
  A known `outvar` is its own input (the program only places it)."""
  from jax.extend.core import Literal  # pylint: disable=g-import-not-at-top
  if isinstance(outvar, Literal) or outvar in known:
    return [], [] if isinstance(outvar, Literal) else [outvar]
  wanted, picked = {outvar}, []
  for eqn in reversed(eqns):
    if any(v in wanted for v in eqn.outvars):
      picked.append(eqn)
      wanted.update(v for v in eqn.invars if not isinstance(v, Literal))
  picked.reverse()
  inputs = []
  for eqn in picked:
    inputs += [v for v in eqn.invars if not isinstance(v, Literal) and v in known and
               v not in inputs]
  return picked, inputs


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _as_host(x):
  """A known value as a numpy argument (typed RNG keys as their raw key data): one value
  every process passes alike, so the per-leaf programs also run under multi-host meshes."""
  return np.asarray(jax.random.key_data(x) if _is_key(x) else x)


# (printed leaf jaxpr, key impls, sharding) -> jitted program, shared by every init in the
# process: a pipeline's networks (policy, reference, critic, reward model) have the same
# parameter shapes, and each compiled program serves all of them. The printed jaxpr shows
# every equation's primitive, non-default parameters, literals and shapes.
_LEAF_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_MAX_LEAF_PROGRAMS = 256


def _leaf_program(sub, key_impls, out_sharding):
  cache_key = (str(sub), tuple(map(str, key_impls)), out_sharding)
  if cache_key in _LEAF_PROGRAMS:
    _LEAF_PROGRAMS.move_to_end(cache_key)
    return _LEAF_PROGRAMS[cache_key]
  from jax.extend.core import ClosedJaxpr, jaxpr_as_fun  # pylint: disable=g-import-not-at-top
  run = jaxpr_as_fun(ClosedJaxpr(sub, []))

  def program(*args):
    args = [a if impl is None else jax.random.wrap_key_data(a, impl=impl)
            for a, impl in zip(args, key_impls)]
    return run(*args)[0]

  _LEAF_PROGRAMS[cache_key] = jax.jit(program, out_shardings=out_sharding)
  if len(_LEAF_PROGRAMS) > _MAX_LEAF_PROGRAMS:
    _LEAF_PROGRAMS.popitem(last=False)
  return _LEAF_PROGRAMS[cache_key]


def _per_leaf_programs(closed, shardings) -> list:
  """How to make each output of a traced constructor: its cheap equations run eagerly here,
  then each output gets a jitted program of the equations it needs (`_leaf_program`, cached
  by equations and sharding) and the host values of their inputs."""
  from jax.extend.core import ClosedJaxpr, jaxpr_as_fun  # pylint: disable=g-import-not-at-top
  jaxpr = closed.jaxpr
  known, cheap, bulk = set(jaxpr.constvars), [], []
  for eqn in jaxpr.eqns:
    if _is_cheap(eqn, known):
      cheap.append(eqn)
      known.update(eqn.outvars)
    else:
      bulk.append(eqn)
  slices = [_slice(v, bulk, known) for v in jaxpr.outvars]
  needed = list(dict.fromkeys(v for _, inputs in slices for v in inputs))
  eager = jaxpr_as_fun(ClosedJaxpr(_jaxpr(jaxpr.constvars, [], needed, cheap), closed.consts))()
  value = dict(zip(needed, eager))
  out = []
  for outvar, (eqns, inputs), sh in zip(jaxpr.outvars, slices, shardings):
    impls = [jax.random.key_impl(value[v]) if _is_key(value[v]) else None for v in inputs]
    program = _leaf_program(_jaxpr([], inputs, [outvar], eqns), impls, sh)
    out.append((program, tuple(_as_host(value[v]) for v in inputs)))
  return out
