"""Sharding as data: a named device mesh plus a table mapping logical axis names to mesh axes.

Model code tags every parameter with logical axes (`nnx.Param(..., logical_axes=("embed",
"mlp"))`) and may constrain activations with `constrain(x, ("activation_batch", ...))`.
Only this file knows the mesh axes `data`, `fsdp`, `tensor`, `expert`. Changing how a model
is laid out over devices means editing `LOGICAL_AXIS_RULES` (or passing other rules), never
model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
from absl import logging
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
# The vocabulary follows MaxText. Weights are sharded over `fsdp` along `embed` (ZeRO-3
# style: gathered per layer in the forward pass), over `tensor` along the Megatron split
# dims (heads, mlp, vocab) and over `expert` along the expert dim of MoE weights.
# Activations are split over the batch, `expert` included (expert-as-data: outside the
# expert FFNs those devices are data parallel); MoE expert buffers are split over `expert`.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_exp", "expert"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),  # per-head feature dim
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("norm", None),
    ("scalar", None),  # output dim of value / reward heads
    ("layers", None),  # the stacked-layer axis of scanned blocks (model.scan_layers)
    ("lora_rank", None),  # the inner dim of LoRA adapters; their outer dims follow the weight's
    ("ensemble", "expert"),  # the member axis of stacked reward-model ensembles (lab/)
)

BATCH_AXES = ("data", "fsdp", "expert")  # Mesh axes that split the global batch.

_ACTIVE_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "rlhf_jax_axis_rules", default=None)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes `data, fsdp, tensor, expert`; one size may be -1 (fill the rest).

  `num_devices` (optional, 0 = all) restricts the mesh to the first devices, e.g. to debug
  on one device of a host that has eight.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh_cfg = dict(mesh_cfg)
  num_devices = int(mesh_cfg.pop("num_devices", 0) or 0)
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"mesh.num_devices is {num_devices} but only {len(devices)} devices exist.")
    devices = devices[:num_devices]
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh config: unknown axis {unknown}; the axes are {MESH_AXES}.")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh config: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh config: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise ValueError(f"mesh config: {len(devices)} devices do not divide by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))} (product {fixed}).")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh config: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {len(devices)} are available; set one axis to -1 to fill.")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> P:
  """('embed', 'mlp') -> P('fsdp', 'tensor'). A mesh axis is used at most once per array."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical_axes:
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table "
                     f"(known: {sorted(table)}).")
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*out)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_divisible(name: str, shape, spec: P, mesh: Mesh, logical=None):
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % n:
      what = f" (logical axis {logical[dim]!r})" if logical else ""
      raise ValueError(
          f"{name}: dimension {dim}{what} has size {shape[dim]}, which does not divide mesh "
          f"axis {'x'.join(axes)} of size {n}. Change the model size or the mesh config "
          f"(e.g. --config.mesh.{axes[0]}=1).")


def param_shardings(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedSharding for every parameter of an (abstract) nnx.State, checked for divisibility."""

  def one(path, var):
    logical = var.get_metadata().get("logical_axes")
    if logical is None:
      spec = P()
    else:
      if len(logical) != len(var.shape):
        raise ValueError(f"parameter {_path_str(path)}: logical axes {logical} do not match "
                         f"its rank {len(var.shape)}.")
      spec = logical_to_spec(logical, rules)
      _check_divisible(f"parameter {_path_str(path)}", var.shape, spec, mesh, logical)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def init_sharded(create_model: Callable[[], nnx.Module], mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """(graphdef, params) with params created directly in their shards (no full host copy).

  `create_model` builds the module from its own `nnx.Rngs`. Its constructor is traced once
  (`make_jaxpr`) and split: the RNG keys and counters are computed eagerly, and each
  parameter is then made from its key by a small program jitted with that parameter's
  sharding, one compiled program per distinct (computation, shape, sharding), reused across
  layers and by later inits in the process (a pipeline's policy, reference, critic and reward
  model). So each device only ever materialises its own slice, and the values are
  bit-identical to `jax.jit(create_model)`'s (same keys, same ops). Why not one program for
  the whole constructor, as before: at the TinyLlama-1.1B shape it took 2 min 22 s to compile
  on a GPU (9.6 s on CPU, against 1.4 s for the 8 per-parameter programs) and held every
  parameter's random bits as temporaries (5.9 GiB, against 0.7 GiB); benchmarks/README.md.
  """
  from rlhf_jax import sharded_init  # pylint: disable=g-import-not-at-top
  try:
    graphdef, treedef, calls = sharded_init.init_programs(create_model, mesh, rules)
  except (ImportError, AttributeError, TypeError) as e:  # jax.extend.core moved (other JAX)
    logging.warning("per-parameter init unavailable on jax %s (%s: %s); compiling the whole "
                    "constructor as one program instead.", jax.__version__, type(e).__name__, e)
    return _init_one_program(create_model, mesh, rules)
  with use_mesh(mesh, rules):
    values = [program(*args) for program, args in calls]
  return graphdef, jax.tree.unflatten(treedef, values)


def _init_one_program(create_model, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """The whole constructor as one jitted program with the parameters' out_shardings (the
  fallback of `init_sharded`; same values)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(create_model))
  with use_mesh(mesh, rules):
    params = jax.jit(lambda: nnx.split(create_model())[1],
                     out_shardings=param_shardings(abstract, mesh, rules))()
  return graphdef, params


def stacked_sharding(member, size: int, logical: str = "ensemble",
                     rules=LOGICAL_AXIS_RULES) -> NamedSharding | None:
  """The sharding of `size` arrays stacked on a new leading axis named `logical`, each laid out
  as `member`: the new axis goes over its rule's mesh axes that `member` leaves free (an MoE
  member already split over `expert` keeps it, and the stack is replicated instead). None
  (let jit decide) for arrays that are not on a mesh."""
  if not isinstance(member, NamedSharding):
    return None
  free = tuple(a for a in jax.tree.leaves(tuple(logical_to_spec((logical,), rules)))
               if a not in jax.tree.leaves(tuple(member.spec)))
  n = math.prod(member.mesh.shape[a] for a in free)
  if size % n:
    raise ValueError(f"{size} stacked members (logical axis {logical!r}) do not divide mesh "
                     f"axis {'x'.join(free)} of size {n}: use a multiple of {n} members or "
                     f"--config.mesh.{free[0]}=1.")
  lead = None if not free else (free[0] if len(free) == 1 else free)
  return NamedSharding(member.mesh, P(lead, *member.spec))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim split over `data` x `fsdp` x `expert`, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_rows(mesh: Mesh, n: int) -> np.ndarray:
  """Global row indices of an n-row batch that this process holds, in its local order.

  These are the rows `make_array_from_process_local_data` places this process's local batch
  at: its devices' slices of the batch dim, sorted and deduplicated (devices that differ
  only along non-batch axes hold the same rows).
  """
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((n,))
  starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else n)
                   for s in index_map.values()})
  return np.concatenate([np.arange(a, b) for a, b in starts])


@functools.lru_cache(maxsize=64)
def process_block(mesh: Mesh) -> tuple[int, int]:
  """(block, num_blocks): the batch dim splits into `num_blocks` equal contiguous blocks
  and this process feeds block `block` (what `EpochIterator` takes as process index/count).

  One process: (0, 1). Processes that differ only along a non-batch axis (e.g. `tensor`
  spanning hosts) feed the same block. It is the block's place in the mesh, not the process
  index, so the global batch is the same whatever the number of processes.
  """
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  rows = process_rows(mesh, n)
  local = len(rows)
  if not np.array_equal(rows, np.arange(rows[0], rows[0] + local)) or rows[0] % local:
    raise ValueError(
        f"process {jax.process_index()} holds batch shards {rows.tolist()} of {n}: not one "
        f"contiguous block, so per-process data loading cannot feed it. Order the mesh so that "
        f"each process's devices are adjacent along {' x '.join(BATCH_AXES)} (e.g. put the "
        "axis that spans hosts first: --config.mesh.data=<num processes>).")
  return int(rows[0]) // local, n // local


def shard_batch(batch, mesh: Mesh):
  """Places this process's rows of a global batch (leading batch dim) on the mesh.

  With one process its rows are the whole batch; with several, each passes its own block
  (`process_block`) and `make_array_from_process_local_data` assembles the global array.
  """
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  num_blocks = process_block(mesh)[1]

  def put(path, x):
    x = np.asarray(x)
    global_rows = x.shape[0] * num_blocks if x.ndim else 0
    if x.ndim == 0 or global_rows % n:
      raise ValueError(f"batch field {_path_str(path)!r} has global shape "
                       f"{(global_rows,) + x.shape[1:]}; its leading dim must divide "
                       f"{' x '.join(BATCH_AXES)} = {n}. Change the batch size or the mesh.")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree_util.tree_map_with_path(put, batch)


def shard_global_batch(batch, mesh: Mesh):
  """Like `shard_batch`, for a batch every process holds whole (eval sets, PPO minibatches
  cut from gathered experience): each process passes on only its own rows."""
  def mine(x):
    x = np.asarray(x)
    return x[process_rows(mesh, x.shape[0])] if x.ndim and jax.process_count() > 1 else x
  return shard_batch(jax.tree.map(mine, batch), mesh)


def to_host(tree):
  """Numpy copies of (global) arrays, whole on every process: `device_get` for one process;
  with several, the rows other processes hold are gathered (`process_allgather`)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Makes `mesh` the current mesh and `rules` the active table for `constrain`."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation; a no-op outside `use_mesh` (single-device code)."""
  rules = _ACTIVE_RULES.get()
  if rules is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  spec = []
  for size, axes in zip(x.shape, logical_to_spec(logical_axes, rules)):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    # A dim too small for all its mesh axes (e.g. batch 1 while decoding) is split over the
    # longest prefix of them that divides it, or replicated.
    while names and size % math.prod(mesh.shape[a] for a in names):
      names = names[:-1]
    spec.append(names[0] if len(names) == 1 else (names or None))
  return jax.lax.with_sharding_constraint(x, P(*spec))


def for_each_batch(fn: Callable, arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh,
                   drop_remainder: bool = False) -> list:
  """`[to_host(fn(start, batch)) for each batch]` over host arrays every process holds whole
  (eval sets, prompts to sample), `batch_size` rows at a time, placed on the mesh.

  Shapes stay fixed (one compiled program): a last partial batch is dropped with
  `drop_remainder`, else filled by wrapping around to the first rows; the caller keeps the
  first `n` rows of what it concatenates.
  """
  n = len(next(iter(arrays.values())))
  if n == 0:
    return []
  if drop_remainder:
    idx = np.arange(n - n % batch_size)
  else:
    idx = np.arange(n + (-n % batch_size)) % n
  out = []
  with use_mesh(mesh):
    for start in range(0, len(idx), batch_size):
      rows = idx[start:start + batch_size]
      batch = shard_global_batch({k: np.asarray(v)[rows] for k, v in arrays.items()}, mesh)
      out.append(to_host(fn(start, batch)))
  return out
