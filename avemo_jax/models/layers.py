"""`nn.Conv` and max pooling in the forms XLA's CPU backend runs fast; convolutions elsewhere.

- a 1x1 convolution is a matrix product over the channels (all platforms: XLA's CPU convolutions
  ran them at about half a product's speed);
- a kxk convolution on CPU, where XLA runs it with YNNPACK (`xla_cpu`: XLA's default on AMD Zen 5
  and non-x86 CPUs), is `_cpu_conv`, with its own gradient; where XLA runs it with Eigen, XLA's plain
  convolution (the fastest form there). `_cpu_conv`: forward at stride 1 by XLA's convolution,
  padded by at least one on every side and cropped (unpadded windows ran 1.3-2.5x slower),
  strided as im2col (the strided slices of its taps concatenated over channels, times the
  reshaped kernel); the input gradient by XLA's transposed convolution, the kernel gradient as
  dy^T im2col(x) (`_batch_product`), summed over chunks of the batch whose columns stay small
  (`_kernel_grad`);
- 3x3/2 max pooling on CPU is the maximum of its 9 strided slices, its gradient routed by the
  forward's first maximal window position (`_cpu_max_pool`; autodiff through the chain of maxima
  recomputed it per tap).
Measured, form by form: README, *Speed in detail*. On GPU and TPU they stay convolutions and
reduce-windows (the form chosen by the backend while tracing, or by `lax.platform_dependent`
under `every_platform`). Parameters (names, shapes) are `nn.Conv`'s, so checkpoints and converted
weights are unchanged; results equal `lax.conv_general_dilated`'s to float32 rounding, and max
pooling's exactly, gradients included (ties go to the first position, as select-and-scatter's).
Dilated, grouped and non-2-D convolutions pass through unchanged.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from avemo_jax import xla_cpu

# Contexts in jit's cache keys: a function traced outside one is traced again inside it.
_portable = jax.make_user_context(False)
_every_platform = jax.make_user_context(False)


def portable():
  """No platform switch: plain convolutions, max pooling as strided slices (exact, and expressible
  in ONNX, whose converters do not take `platform_dependent` or every reduce-window)."""
  return _portable(True)


def every_platform():
  """Both forms, chosen by `lax.platform_dependent` when lowering: for programs lowered for
  several platforms (`jax.export` in avemo_jax.export). Otherwise the form of this process's
  backend is chosen while tracing, the other neither traced nor differentiated (the face train
  step's trace 2.9 -> 2.5 s on 2 CPU cores)."""
  return _every_platform(True)


def single_platform() -> bool:
  """Whether programs traced now are lowered for this process's backend alone."""
  return not (_portable.value or _every_platform.value)


def _by_platform(*args: jax.Array, cpu, default) -> jax.Array:
  if _every_platform.value:
    return lax.platform_dependent(*args, cpu=cpu, default=default)
  return (cpu if jax.default_backend() == "cpu" else default)(*args)


def _channels_last(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
  """NHWC input and output, HWIO kernel, however `dimension_numbers` says it (as lax takes it)."""
  spatial = lhs.ndim - 2
  lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                           dimension_numbers)
  return (tuple(lhs_spec) == tuple(out_spec) == (0, spatial + 1, *range(1, spatial + 1))
          and tuple(rhs_spec) == (spatial + 1, spatial, *range(spatial)))


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


def _batch_product(a: jax.Array, dy: jax.Array, precision, preferred_element_type) -> jax.Array:
  """a^T dy summed over every leading dimension ([B, ..., M], [B, ..., N] -> [M, N]): a weight
  gradient. When the contraction is long and the output small, one product per half of the batch
  (a batched product, halves summed), which XLA ran 1.9-3x faster on 2 Xeon cores (1x1, batch
  32: 67x67x64 -> 80 21.5 -> 7.5 ms, 33x33x192 -> 32 5.5 -> 1.8, 15x15x256 -> 32 1.4 -> 0.7) and
  up to 3x slower when short (7x7x384 -> 896 3.4 -> 6.1, 3x3x1792 -> 192 1.0 -> 3.4). The product
  transposes its left operand: the narrower goes left (a kxk convolution's im2col columns are
  wide: 67x67x32 -> 64, 34 ms to transpose them, 3 ms dy), and dy for the halves (7.5 against
  10.2 ms)."""
  m, n, lead = a.shape[-1], dy.shape[-1], tuple(range(a.ndim - 1))
  product = functools.partial(lax.dot_general, precision=precision,
                              preferred_element_type=preferred_element_type)
  if dy.shape[0] % 2 == 0 and 2 * (a.size // m) >= m * n:
    halves = lambda t: t.reshape(2, -1, t.shape[-1])
    return product(halves(dy), halves(a), (((1,), (1,)), ((0,), (0,)))).sum(0).T
  if m <= n:
    return product(a, dy, ((lead, lead), ((), ())))
  return product(dy, a, ((lead, lead), ((), ()))).T


def _cols(x: jax.Array, window: tuple[int, int], strides, pads) -> jax.Array:
  """im2col: the taps of the padded x concatenated over channels, [B, Ho, Wo, kh*kw*C]."""
  return jnp.concatenate(_taps(jnp.pad(x, [(0, 0), *pads, (0, 0)]), window, strides), axis=-1)


# The kernel gradient's im2col columns per chunk of the batch (2 Xeon cores, batch 32, gradient
# alone: 69x69x32 -> 32 104 -> 31 ms, 33x33x80 -> 192 97 -> 54, VGGish's 24x16x256 -> 256 127 ->
# 75; the face train step's temporaries 1613 -> 1176 MB).
_CHUNK_BYTES = 16 << 20


def _kernel_grad(x, dy, window, strides, pads, precision, preferred_element_type):
  """dy^T im2col(x) [kh*kw*C, K], summed over n chunks of the batch whose columns take at most
  `_CHUNK_BYTES` (n the smallest divisor of the batch that allows it); chunk i holds images i,
  i + n, ..., so a batch sharded over devices stays sharded. Accumulated in float32 at least."""
  b, tap_bytes = x.shape[0], window[0] * window[1] * x.shape[-1] * x.dtype.itemsize
  image_bytes = dy[0].size // dy.shape[-1] * tap_bytes
  n = next(n for n in range(1, b + 1)
           if b % n == 0 and (b // n * image_bytes <= _CHUNK_BYTES or n == b))
  accumulate = preferred_element_type or jnp.promote_types(dy.dtype, jnp.float32)
  # Operands cast to the accumulator's type: XLA's CPU dot has no bf16 x bf16 -> f32.
  product = lambda x, dy: _batch_product(_cols(x, window, strides, pads).astype(accumulate),
                                         dy.astype(accumulate), precision, accumulate)
  if n == 1:
    return product(x, dy)
  xs, dys = (t.reshape(b // n, n, *t.shape[1:]) for t in (x, dy))
  pick = lambda t, i: lax.dynamic_index_in_dim(t, i, 1, keepdims=False)
  zeros = jnp.zeros((tap_bytes // x.dtype.itemsize, dy.shape[-1]), accumulate)
  return lax.fori_loop(0, n, lambda i, total: total + product(pick(xs, i), pick(dys, i)), zeros)


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


def _cpu_conv_bwd(strides, pads, precision, preferred_element_type, residuals, dy):
  """Input gradient by XLA's transposed convolution, kernel gradient of im2col(x)."""
  x, w = residuals
  _, transpose = jax.vjp(
      lambda x: _xla_conv(x, w, strides, pads, precision, preferred_element_type), x)
  dw = _kernel_grad(x, dy, w.shape[:2], strides, pads, precision, preferred_element_type)
  return transpose(dy)[0], dw.reshape(w.shape).astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_pointwise(x: jax.Array, w: jax.Array, precision, preferred_element_type) -> jax.Array:
  """A 1x1 convolution on CPU: the product over the channels, its weight gradient by
  `_batch_product`."""
  return _matmul(x, w, precision, preferred_element_type)


def _cpu_pointwise_fwd(x, w, precision, preferred_element_type):
  return _cpu_pointwise(x, w, precision, preferred_element_type), (x, w)


def _cpu_pointwise_bwd(precision, preferred_element_type, residuals, dy):
  x, w = residuals
  dx = _matmul(dy, w.T, precision, preferred_element_type)
  dw = _batch_product(x, dy, precision, preferred_element_type)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_cpu_pointwise.defvjp(_cpu_pointwise_fwd, _cpu_pointwise_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated`; 1x1 kernels as a matrix product (`_cpu_pointwise` on CPU), kxk
  ones `_cpu_conv` on CPU when XLA's convolutions are YNNPACK's (`xla_cpu.convolutions`)."""
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  ones = lambda v: v is None or all(d == 1 for d in v)
  options = {"precision": precision, "preferred_element_type": preferred_element_type}
  if (rhs.ndim != 4 or not _channels_last(lhs, rhs, dimension_numbers) or not ones(lhs_dilation)
      or not ones(rhs_dilation) or feature_group_count != 1 or batch_group_count != 1
      or _portable.value):
    return plain(lhs, rhs)
  strides = tuple(window_strides) if window_strides else (1, 1)
  pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
          if isinstance(padding, str) else [tuple(p) for p in padding])
  if rhs.shape[:2] == (1, 1) and strides == (1, 1) and all(p == (0, 0) for p in pads):
    return _by_platform(lhs, rhs.reshape(rhs.shape[2:]),
                        cpu=functools.partial(_cpu_pointwise, **options),
                        default=functools.partial(_matmul, **options))
  if xla_cpu.convolutions() == "eigen":  # XLA's own kxk convolutions: its fastest form there
    return plain(lhs, rhs)
  cpu = functools.partial(_cpu_conv, strides=strides, pads=tuple(map(tuple, pads)), **options)
  return _by_platform(lhs, rhs, cpu=cpu, default=plain)


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
  if _portable.value:
    return _slice_max_pool(x, window, strides)
  plain = lambda x: nn.max_pool(x, window, strides=strides, padding="VALID")
  cpu = functools.partial(_cpu_max_pool, window=window, strides=strides, shape=x.shape)
  return _by_platform(x, cpu=cpu, default=plain)
