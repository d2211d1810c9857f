"""`nn.Conv` and max pooling in the forms XLA's CPU backend runs fast; convolutions elsewhere.

Measured on 2 EPYC cores (jax 0.10.2, batch 32, the face network's own shapes, freed memory kept:
`avemo_jax.hostmem`), XLA's CPU convolutions and pooling gradients run well below its matrix
products and elementwise maxima:
- a 1x1 convolution is a matrix product over the channels: 17x17x128 -> 128 at 180 against 395
  GFLOP/s as a product, 8x8x896 -> 128 at 197 against 440, 69x69x64 -> 80 at 30 against 86;
- a kxk convolution on CPU is the strided slices of its k*k taps, concatenated over channels
  (im2col) and multiplied by the reshaped kernel: the stem's 3x3 convolutions take 0.6-0.85x the
  time forward and 0.5-0.9x with gradients (e.g. 67x67x32 -> 64: 42.5 -> 30.3 ms forward, 140.8
  -> 88.3 ms with gradients);
- 3x3/2 max pooling on CPU is the maximum of its 9 strided slices: 67x67x64 forward 6.8 -> 1.5 ms,
  with its gradient 77.6 -> 14.4 ms (XLA's reduce-window gradient is select-and-scatter).
On GPU and TPU (`lax.platform_dependent`) they stay convolutions and reduce-windows. Parameters
(names, shapes) are `nn.Conv`'s, so checkpoints and converted weights are unchanged; results equal
`lax.conv_general_dilated`'s to float32 rounding, and max pooling's exactly (its gradient splits
ties evenly, where reduce-window's picks one: both are subgradients, and the pools here follow
ReLUs, whose zeros get no gradient either way). Dilated, grouped and non-2-D convolutions pass
through unchanged.
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


def _im2col(x: jax.Array, w: jax.Array, *, strides, pads, precision,
            preferred_element_type) -> jax.Array:
  """2-D NHWC x HWIO convolution as one matrix product over the concatenated taps."""
  kh, kw, c, k = w.shape
  taps = _taps(jnp.pad(x, [(0, 0), *pads, (0, 0)]), (kh, kw), tuple(strides))
  return _matmul(jnp.concatenate(taps, axis=-1), w.reshape(kh * kw * c, k), precision,
                 preferred_element_type)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`; 1x1 kernels as a matrix product, kxk ones as im2col on CPU."""
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
  im2col = functools.partial(_im2col, strides=strides, pads=pads, precision=precision,
                             preferred_element_type=preferred_element_type)
  return lax.platform_dependent(lhs, rhs, cpu=im2col, default=plain)


Conv: Any = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _slice_max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  return functools.reduce(jnp.maximum, _taps(x, window, strides))


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  """`nn.max_pool(x, window, strides, padding="VALID")` of NHWC x; strided slices on CPU."""
  if getattr(_state, "portable", False):
    return _slice_max_pool(x, window, strides)
  plain = lambda x: nn.max_pool(x, window, strides=strides, padding="VALID")
  return lax.platform_dependent(x, cpu=functools.partial(_slice_max_pool, window=window,
                                                          strides=strides), default=plain)
