"""LM head + cross-entropy over chunks of positions, with its gradient computed on the way.

    sum_t w_t * CE(h_t @ W, y_t)   and   sum_t w_t * [y_t's logit is the maximum]

The plain way writes the logits of every position, [B, T, V] float32 (64 MB for 16 x 128
tokens and an 8k vocabulary; 2 GB at 128k), reads them back for the softmax and again for its
gradient. Here the positions go through in chunks of `chunk_len` (`lax.scan`), and while a
chunk's logits are at hand the forward also forms their gradient:
d/dlogits = w_t * (softmax - onehot), hence dh for the chunk and its part of dW. The backward
pass then only scales those by the incoming cotangent (a `custom_vjp`), so no [B, T, V]
array exists in either pass: memory for the head is B x chunk_len x V instead of B x T x V
(the "vocab tiling" of large-vocabulary training). Speed on the CPU benchmark's SFT step is
the same either way (measured A/B). Without a gradient (evaluation) the forward computes the
loss only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.layers import dense


def _chunk_stats(h_BxCxD, w_DxV, targets_BxC, weights_BxC, need_grad: bool):
  logits_BxCxV = dense(h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], -1)[..., 0]
  ce_sum = ((lse_BxC - target_BxC) * weights_BxC).sum()
  # Correct when the target's logit is the maximum (ties count as correct).
  correct_sum = ((target_BxC >= logits_BxCxV.max(-1)) * weights_BxC).sum()
  if not need_grad:
    return ce_sum, correct_sum, None, None
  v = logits_BxCxV.shape[-1]
  dlogits_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None])
                   - jax.nn.one_hot(targets_BxC, v, dtype=jnp.float32)) * weights_BxC[..., None]
  dh_BxCxD = dense(dlogits_BxCxV.astype(h_BxCxD.dtype), w_DxV.T,
                   preferred_element_type=jnp.float32)
  d = h_BxCxD.shape[-1]
  dw_DxV = jnp.dot(h_BxCxD.reshape(-1, d).T, dlogits_BxCxV.reshape(-1, v).astype(h_BxCxD.dtype),
                   preferred_element_type=jnp.float32)
  return ce_sum, correct_sum, dh_BxCxD, dw_DxV


def _scan(h_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk_len: int, need_grad: bool):
  b, t, d = h_BxTxD.shape
  n = -(-t // chunk_len)
  pad = n * chunk_len - t
  if pad:  # padded positions have weight 0: no loss, no gradient
    h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    weights_BxT = jnp.pad(weights_BxT, ((0, 0), (0, pad)))

  # [n, B, C, ...]: chunks along the length axis, so a batch-sharded B stays sharded.
  def chunks(x):
    return jnp.swapaxes(x.reshape(b, n, chunk_len, *x.shape[2:]), 0, 1)

  def body(carry, chunk):
    ce, correct, dw = carry
    h_BxCxD, targets_BxC, weights_BxC = chunk
    c_ce, c_correct, dh, c_dw = _chunk_stats(h_BxCxD, w_DxV, targets_BxC, weights_BxC,
                                             need_grad)
    if need_grad:
      dw = dw + c_dw
    return (ce + c_ce, correct + c_correct, dw), dh

  zero = jnp.zeros((), jnp.float32)
  dw0 = jnp.zeros(w_DxV.shape, jnp.float32) if need_grad else zero
  (ce, correct, dw), dh = jax.lax.scan(
      body, (zero, zero, dw0), (chunks(h_BxTxD), chunks(targets_BxT), chunks(weights_BxT)))
  if not need_grad:
    return ce, correct, None, None
  dh_BxTxD = jnp.swapaxes(dh, 0, 1).reshape(b, n * chunk_len, d)[:, :t]
  return ce, correct, dh_BxTxD.astype(h_BxTxD.dtype), dw.astype(w_DxV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_token_ce(h_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk_len: int):
  """(weighted CE sum, weighted count of correct argmax), both float32 scalars; the CE sum
  is differentiable in `h_BxTxD` and `w_DxV` (the count is a metric: zero gradient)."""
  ce, correct, _, _ = _scan(h_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk_len, False)
  return ce, correct


def _fwd(h_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk_len):
  ce, correct, dh, dw = _scan(h_BxTxD, w_DxV, targets_BxT, weights_BxT, chunk_len, True)
  return (ce, correct), (dh, dw, targets_BxT, weights_BxT)


def _bwd(chunk_len, res, cotangents):
  del chunk_len
  dh, dw, targets_BxT, weights_BxT = res
  g_ce = cotangents[0]
  return ((g_ce * dh).astype(dh.dtype), (g_ce * dw).astype(dw.dtype),
          _zero_cotangent(targets_BxT), jnp.zeros_like(weights_BxT))


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.integer):
    return np.zeros(x.shape, jax.dtypes.float0)  # integer inputs take float0 cotangents
  return jnp.zeros_like(x)


chunked_token_ce.defvjp(_fwd, _bwd)
