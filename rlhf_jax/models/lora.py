"""LoRA (Hu et al. 2021): a trained low-rank update on frozen projection weights.

    y = x W + (alpha / r) * dropout(x) A B        A: [*in, r],  B: [r, *out]

for the projections named in `LoRAConfig.targets` (q, k, v, o of attention; gate, up, down
of the dense SwiGLU; MoE experts are not adapted). B starts at zero, so a fresh adapter
changes nothing; A ~ N(0, 1/d_in) (LeCun normal: x A is O(1) whatever the rank, the scale
PEFT's default Kaiming-uniform init gives to within a factor of 3).

Adapters are `LoRAParam` variables on the modules they adapt (`attn.q_lora.a`, ...), with
the base weight's logical axes on their outer dims and `lora_rank` (unsharded) inside, so
they shard like the weight they adapt. Training keeps the base frozen (`train.state`'s
`trainable` filter): only adapters and scalar heads get gradients and optimizer state, and
checkpoints hold only them. `base_state` is the same parameters without the adapters (the
RL reference: the base with adapters switched off, no second copy); `merge` folds the
adapters into the base weights (export, and the hand-over to the next stage).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from rlhf_jax.keys import check_known_keys

# target -> (module attribute holding the base weight, number of contracted input dims)
TARGETS = {"q": ("q_DxNxH", 1), "k": ("k_DxKxH", 1), "v": ("v_DxKxH", 1), "o": ("o_NxHxD", 2),
           "gate": ("gate_DxF", 1), "up": ("up_DxF", 1), "down": ("down_FxD", 1)}
# Parameters trained fully alongside the adapters: the scalar heads (RM head, value heads).
HEADS = ("reward_head", "value_head")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank 0: no adapters (full fine-tuning)."""

  rank: int = 0
  alpha: float = 16.0  # the update is scaled by alpha / rank
  dropout: float = 0.0  # on the adapter's input, training steps only
  targets: tuple[str, ...] = tuple(TARGETS)
  # Also train a policy's LM head fully (PEFT's modules_to_save=["lm_head"]; the input
  # embedding when tied). Measured: on the 64-wide test model, LoRA PPO on sentiment raised
  # gold in 12 iterations only with it (frozen head: no gain at lr 3e-3..2e-2, rank 8..32).
  train_lm_head: bool = False

  def __post_init__(self):
    def need(ok: bool, msg: str):
      if not ok:
        raise ValueError(f"lora config: {msg}")

    need(isinstance(self.rank, int) and self.rank >= 0,
         f"`lora.rank` must be an int >= 0 (0: no adapters), got {self.rank!r}.")
    need(self.alpha > 0, f"`lora.alpha` must be positive, got {self.alpha}.")
    need(0.0 <= self.dropout < 1.0, f"`lora.dropout` must be in [0, 1), got {self.dropout}.")
    unknown = [t for t in self.targets if t not in TARGETS]
    need(not unknown and self.targets,
         f"`lora.targets` {','.join(self.targets)!r} names {unknown or 'nothing'}; choose a "
         f"comma-separated subset of {','.join(TARGETS)}.")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapts(self, target: str) -> bool:
    return self.enabled and target in self.targets

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> "LoRAConfig":
    """From a ConfigDict / dict; `targets` may be a comma-separated string."""
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    cfg.pop("stages", None)  # which stages use the adapters: `for_stage`'s business
    check_known_keys("lora", cfg, (f.name for f in dataclasses.fields(cls)))
    targets = cfg.get("targets", tuple(TARGETS))
    if isinstance(targets, str):
      targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return cls(**dict(cfg, targets=tuple(targets)))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class LoRAParam(nnx.Param):
  """An adapter matrix: the only trained parameters of a LoRA network besides its heads."""


class DropoutKey(nnx.Variable):
  """The key of an adapter's dropout mask: set by the training step from its seed, the step
  and the adapter's path (`train.state`), only read in the forward (no stateful stream)."""


class Adapter(nnx.Module):
  """The low-rank update of one projection, `scale * dropout(x) A B`.

  A is created as zeros here and drawn by `init_adapters`, so building a LoRA network takes
  no keys from its `nnx.Rngs`: its base weights are those of the dense network of the same
  seed.
  """

  def __init__(self, cfg: LoRAConfig, in_shape, in_axes, out_shape, out_axes):
    r = cfg.rank
    self.a = LoRAParam(jnp.zeros((*in_shape, r), jnp.float32),
                       logical_axes=(*in_axes, "lora_rank"))
    self.b = LoRAParam(jnp.zeros((r, *out_shape), jnp.float32),
                       logical_axes=("lora_rank", *out_axes))
    self.scale = cfg.scale
    self.contract = len(in_shape)
    # Off (deterministic) unless a training step turns it on (`model.train()`): samplers and
    # evaluation never drop.
    self.rate = cfg.dropout
    self.deterministic = True
    self.dropout_key = DropoutKey(jax.random.key(0)) if cfg.dropout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    from rlhf_jax.models.layers import dense  # pylint: disable=g-import-not-at-top
    if self.rate and not self.deterministic:
      keep = jax.random.bernoulli(self.dropout_key[...], 1.0 - self.rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
    a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
    return self.scale * dense(dense(x, a, self.contract), b)


def adapter(cfg: LoRAConfig, target: str, w: nnx.Param) -> Adapter | None:
  """The adapter of base weight `w` (named by `target`), or None when not adapted."""
  if not cfg.adapts(target):
    return None
  k = TARGETS[target][1]
  axes = w.get_metadata()["logical_axes"]
  return Adapter(cfg, w.shape[:k], axes[:k], w.shape[k:], axes[k:])


def is_adapter(path, _=None) -> bool:
  """nnx filter: an adapter matrix."""
  return bool(path) and path[-1] in ("a", "b") and any(
      str(p).endswith("_lora") for p in path[:-1])


@dataclasses.dataclass(frozen=True)
class Trainable:
  """nnx filter of what a LoRA network trains: its adapters, its scalar heads, and with
  `lm_head` a policy's LM head too (the input embedding when `tied`). A value, so equal
  filters give equal `TrainState` tree structures."""
  lm_head: bool = False
  tied: bool = False

  def __call__(self, path, _=None) -> bool:
    names = tuple(str(p) for p in path)
    if is_adapter(path) or any(n in HEADS for n in names):
      return True
    if not self.lm_head or names[0] == "critic":
      return False
    return names[-1] == "lm_head_DxV" or (self.tied and names[-2:] == ("trunk", "embed_VxD"))


is_trainable = Trainable()  # adapters and scalar heads


def trainable_of(cfg) -> Trainable | None:
  """The `train.state` filter of what trains in a policy (or actor-critic) of model config
  `cfg`; None (everything) without adapters."""
  if not cfg.lora.enabled:
    return None
  return Trainable(cfg.lora.train_lm_head, cfg.tie_embeddings)


def init_adapters(params: nnx.State, seed: int) -> nnx.State:
  """`params` with every adapter's A drawn from N(0, 1/d_in) (B stays zero), one key per
  adapter from `seed` and its path; shardings kept."""
  key = jax.random.PRNGKey(seed)

  def draw(path, x):
    names = tree_path_names(path)
    if names[-1] != "a" or not is_adapter(names):
      return x
    k = jax.random.fold_in(key, zlib.crc32("/".join(map(str, names)).encode()))
    fan_in = math.prod(x.shape[-1 - _contract(names):-1])
    return jax.random.normal(k, x.shape, x.dtype) / math.sqrt(fan_in)

  return jax.jit(lambda p: jax.tree_util.tree_map_with_path(draw, p),
                 out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


def tree_path_names(path) -> tuple:
  """A jax tree path of an nnx.State leaf as nnx names ('trunk', 'blocks', 0, 'attn', ...),
  without the Variable's own `.value` step."""
  return tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path
               if not isinstance(p, jax.tree_util.GetAttrKey))


def _contract(names) -> int:
  target = names[-2][:-len("_lora")]
  return TARGETS[target][1]


def base_state(params: nnx.State) -> nnx.State:
  """The parameters without the adapters (and their dropout state): the base network's
  state, same arrays (no copy); with the dense graphdef it is the base network."""
  return nnx.filter_state(params, lambda path, _: not _in_adapter(path))


def merge_flat(flat: Mapping[tuple, Any], scale: float) -> dict[tuple, Any]:
  """{path: array} of a LoRA network -> that of the dense network: each adapted weight
  W + scale * A B (computed in float32, stored in W's dtype), adapters removed. Works on
  stacked (scanned) layers too, whose leading dims are batch dims of A and B."""
  out = {p: v for p, v in flat.items() if not _in_adapter(p)}
  for path, a in flat.items():
    if not (is_adapter(path) and path[-1] == "a"):
      continue
    weight, k = TARGETS[str(path[-2])[:-len("_lora")]]
    w_path, b = (*path[:-2], weight), flat[(*path[:-1], "b")]
    w, r = out[w_path], a.shape[-1]
    lead = a.shape[:a.ndim - 1 - k]
    delta = jnp.matmul(jnp.asarray(a, jnp.float32).reshape(*lead, -1, r),
                       jnp.asarray(b, jnp.float32).reshape(*lead, r, -1))
    out[w_path] = (jnp.asarray(w, jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
  return out


def merge(params: nnx.State, scale: float) -> nnx.State:
  """`merge_flat` on an nnx.State (jit it to keep shardings): the dense network's state."""
  flat = dict(nnx.to_flat_state(params))
  merged = merge_flat({p: v[...] for p, v in flat.items()}, scale)
  return nnx.from_flat_state([(p, flat[p].replace(value=v)) for p, v in merged.items()])


def merge_pure(pure: dict, scale: float) -> dict:
  """`merge_flat` on nested dicts of (host) arrays, e.g. a checkpoint read for export."""
  flat = traverse_util.flatten_dict(pure)
  return traverse_util.unflatten_dict(
      {p: np.asarray(v) for p, v in merge_flat(flat, scale).items()})


def _in_adapter(path) -> bool:
  return any(str(p).endswith("_lora") for p in path)


def for_stage(config, stage: str) -> LoRAConfig:
  """The adapters `stage` trains: the top-level `lora` section when `lora.rank` > 0 and
  `lora.stages` names the stage ("all": every training stage); none otherwise."""
  section = config.get("lora") if hasattr(config, "get") else None
  if section is None or not section.rank:
    return LoRAConfig()
  stages = {s.strip() for s in str(section.stages).split(",")}
  if "all" not in stages and stage not in stages:
    return LoRAConfig()
  return LoRAConfig.from_config(section)


def attach(create_lora_model, base_params: nnx.State, seed: int, mesh):
  """(graphdef, params) of the LoRA network `create_lora_model()` whose base is
  `base_params` (the dense network's state, kept as it is: no copy) and whose adapters are
  fresh (`init_adapters`, B = 0: the network computes exactly what the base does), placed
  by the sharding rules on `mesh`."""
  from rlhf_jax import sharding  # pylint: disable=g-import-not-at-top
  graphdef, abstract = nnx.split(nnx.eval_shape(create_lora_model))
  extra = nnx.filter_state(abstract, lambda path, _: _in_adapter(path))
  want = {p: v.shape for p, v in nnx.to_flat_state(abstract) if not _in_adapter(p)}
  have = {p: v.shape for p, v in nnx.to_flat_state(base_params)}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()), key=str)[:3]
    raise ValueError(f"lora: the base parameters do not fit the network (first differences: "
                     f"{diff}); the base must be the dense network of the same model config.")
  fresh = jax.jit(lambda: jax.tree.map(_blank, extra),
                  out_shardings=sharding.param_shardings(extra, mesh))()
  return graphdef, nnx.merge_state(base_params, init_adapters(fresh, seed))


def _blank(x: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of an abstract adapter leaf; a dropout stream's key (reseeded every step)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    key = jax.random.key(0)
    return jax.random.split(key, x.shape) if x.shape else key
  return jnp.zeros(x.shape, x.dtype)
