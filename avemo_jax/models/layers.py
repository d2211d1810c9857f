"""`nn.Conv` and max pooling in the forms XLA's CPU backend runs fast; convolutions elsewhere.

Measured on 2 EPYC cores (jax 0.10.2, batch 32, the face network's own shapes, freed memory kept:
`avemo_jax.hostmem`):
- a 1x1 convolution is a matrix product over the channels (all platforms): 17x17x128 -> 128 at
  180 against 395 GFLOP/s as a product, 8x8x896 -> 128 at 197 against 440;
- a kxk convolution on CPU (`_cpu_conv`, its own gradient): forward at stride 1 by XLA's
  convolution, padded by at least one on every side and cropped (XLA runs unpadded windows
  1.3-2.5x slower: 69x69x32 -> 32 33.7 -> 13.5 ms), strided as im2col (the strided slices of its
  taps concatenated over channels, times the reshaped kernel); the input gradient by XLA's
  transposed convolution, the kernel gradient as dy^T im2col(x) per half of the batch (XLA's
  kernel-gradient convolution ran 1.5-2x slower). Against im2col both ways, 67x67x32 -> 64 with
  gradients 100 -> 90 ms, the teacher step 1115 -> 1051 ms;
- 3x3/2 max pooling on CPU is the maximum of its 9 strided slices (forward 67x67x64 6.8 -> 1.5
  ms), its gradient routed by the forward's first maximal window position (`_cpu_max_pool`): that
  of autodiff through the maxima chain recomputed it per tap and cost 95 ms in the teacher step
  (1231 -> 1141 ms); XLA's reduce-window gradient (select-and-scatter) 77.6 ms alone.
On GPU and TPU (`lax.platform_dependent`) they stay convolutions and reduce-windows. Parameters
(names, shapes) are `nn.Conv`'s, so checkpoints and converted weights are unchanged; results equal
`lax.conv_general_dilated`'s to float32 rounding, and max pooling's exactly, gradients included
(ties go to the first position, as select-and-scatter's). Dilated, grouped and non-2-D
convolutions pass through unchanged.
"""
import contextlib
import functools
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_state = threading.local()


@contextlib.contextmanager
def portable():
  """No platform switch: plain convolutions, max pooling as strided slices (exact, and expressible
  in ONNX, whose converters do not take `platform_dependent` or every reduce-window)."""
  previous, _state.portable = getattr(_state, "portable", False), True
  try:
    yield
  finally:
    _state.portable = previous


def _channels_last(dimension_numbers, spatial: int) -> bool:
  if dimension_numbers is None:
    return False
  lhs, rhs, out = map(tuple, dimension_numbers)
  return (lhs == out == (0, spatial + 1, *range(1, spatial + 1))
          and rhs == (spatial + 1, spatial, *range(spatial)))


def _matmul(x: jax.Array, w: jax.Array, precision, preferred_element_type) -> jax.Array:
  """x [..., C] @ w [C, K]."""
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _taps(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> list[jax.Array]:
  """The kh*kw strided slices of NHWC x, one per window position (no padding)."""
  (kh, kw), (sh, sw), (b, h, w, c) = window, strides, x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  return [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


_NHWC = ("NHWC", "HWIO", "NHWC")


def _cols(x: jax.Array, window: tuple[int, int], strides, pads) -> jax.Array:
  """im2col: the taps of the padded x concatenated over channels, [B, Ho, Wo, kh*kw*C]."""
  return jnp.concatenate(_taps(jnp.pad(x, [(0, 0), *pads, (0, 0)]), window, strides), axis=-1)


def _xla_conv(x, w, strides, pads, precision, preferred_element_type):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _cpu_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
              pads: tuple[tuple[int, int], ...], precision, preferred_element_type) -> jax.Array:
  """2-D NHWC x HWIO convolution: stride 1 by XLA's, padded by at least one on every side of a
  window wider than 1 and cropped; strided as the im2col product."""
  kh, kw, c, k = w.shape
  if strides != (1, 1):
    return _matmul(_cols(x, (kh, kw), strides, pads), w.reshape(kh * kw * c, k), precision,
                   preferred_element_type)
  extra = [(int(n > 1 and lo < 1), int(n > 1 and hi < 1)) for n, (lo, hi) in zip((kh, kw), pads)]
  y = _xla_conv(x, w, strides, [(lo + a, hi + b) for (lo, hi), (a, b) in zip(pads, extra)],
                precision, preferred_element_type)
  (top, bottom), (left, right) = extra
  return y[:, top:y.shape[1] - bottom, left:y.shape[2] - right]


def _cpu_conv_fwd(x, w, strides, pads, precision, preferred_element_type):
  return _cpu_conv(x, w, strides, pads, precision, preferred_element_type), (x, w)


def _kernel_grad(x, dy, window, strides, pads, precision, preferred_element_type):
  """(dy^T im2col(x))^T as one product per half of the batch (a batched product), summed. The
  one product over the whole batch ran slower on 2 Xeon cores (batch 32, alone: 69x69x32 -> 32
  135 -> 106 ms, 67x67x32 -> 64 155 -> 109, 35x35x64 -> 80 81 -> 60; face train step +5%).
  dy^T cols, not cols^T dy: the product transposes its left operand, dy being the narrower
  (67x67x32 -> 64: 34 ms to transpose the columns, 3 ms dy)."""
  parts = 2 if dy.shape[0] % 2 == 0 else 1
  halves = lambda a: a.reshape(parts, -1, a.shape[-1])
  cols = _cols(x, window, strides, pads)
  dw_t = lax.dot_general(halves(dy), halves(cols), (((1,), (1,)), ((0,), (0,))),
                         precision=precision, preferred_element_type=preferred_element_type
                         ).sum(0)
  return dw_t.T.reshape(*window, x.shape[-1], dy.shape[-1])


def _cpu_conv_bwd(strides, pads, precision, preferred_element_type, residuals, dy):
  """Input gradient by XLA's transposed convolution, kernel gradient by `_kernel_grad`."""
  x, w = residuals
  _, transpose = jax.vjp(
      lambda x: _xla_conv(x, w, strides, pads, precision, preferred_element_type), x)
  dw = _kernel_grad(x, dy, w.shape[:2], strides, pads, precision, preferred_element_type)
  return transpose(dy)[0], dw.astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`; 1x1 kernels as a matrix product, kxk ones `_cpu_conv` on CPU."""
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  ones = lambda v: v is None or all(d == 1 for d in v)
  if (rhs.ndim != 4 or not _channels_last(dimension_numbers, 2) or not ones(lhs_dilation)
      or not ones(rhs_dilation) or feature_group_count != 1 or batch_group_count != 1
      or getattr(_state, "portable", False)):
    return plain(lhs, rhs)
  strides = tuple(window_strides) if window_strides else (1, 1)
  pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
          if isinstance(padding, str) else [tuple(p) for p in padding])
  if rhs.shape[:2] == (1, 1) and strides == (1, 1) and all(p == (0, 0) for p in pads):
    return _matmul(lhs, rhs.reshape(rhs.shape[2:]), precision, preferred_element_type)
  cpu = functools.partial(_cpu_conv, strides=strides, pads=tuple(map(tuple, pads)),
                          precision=precision, preferred_element_type=preferred_element_type)
  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=plain)


Conv: Any = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _slice_max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  return functools.reduce(jnp.maximum, _taps(x, window, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cpu_max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                  shape: tuple[int, ...]) -> jax.Array:
  del shape  # x's, for the gradient
  return _slice_max_pool(x, window, strides)


def _cpu_max_pool_fwd(x, window, strides, shape):
  del shape
  taps = _taps(x, window, strides)
  y = functools.reduce(jnp.maximum, taps)
  first = jnp.full(y.shape, len(taps), jnp.int8)  # the first window position holding the max
  for t in reversed(range(len(taps))):
    first = jnp.where(taps[t] == y, jnp.int8(t), first)
  return y, first


def _cpu_max_pool_bwd(window, strides, shape, first, g):
  """Each output's gradient to the first window position holding its maximum, as XLA's
  select-and-scatter does (ties included); the forward's window positions, not a recomputation of
  the running maximum, which autodiff of `_slice_max_pool` fuses into an elementwise chain."""
  (_, h, w, _), (kh, kw), (sh, sw), (ho, wo) = shape, window, strides, first.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  dx = 0
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    dx = dx + lax.pad(jnp.where(first == t, g, zero), zero,
                      [(0, 0, 0), (i, h - i - (ho - 1) * sh - 1, sh - 1),
                       (j, w - j - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)])
  return (dx,)


_cpu_max_pool.defvjp(_cpu_max_pool_fwd, _cpu_max_pool_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  """`nn.max_pool(x, window, strides, padding="VALID")` of NHWC x; strided slices on CPU."""
  if getattr(_state, "portable", False):
    return _slice_max_pool(x, window, strides)
  plain = lambda x: nn.max_pool(x, window, strides=strides, padding="VALID")
  cpu = functools.partial(_cpu_max_pool, window=window, strides=strides, shape=x.shape)
  return lax.platform_dependent(x, cpu=cpu, default=plain)
