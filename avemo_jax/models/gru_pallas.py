"""The GRUs' recurrence as one persistent GPU kernel each way (Pallas on Triton), in place of
`fusion._run`'s `lax.scan` and `fusion._recur_bwd`'s: what cuDNN's GRU does, and what the scan
lacks on a GPU (H200: each of its steps a few tiny kernels and the loop's round trip; 0.41x
cuDNN's train step).

One program runs a block of `_ROWS` sequences of one GRU through all T steps, its state in
registers and the recurrent weights in shared memory, reading each step's input projections
(computed before, as for the scan) and writing the state and, for the gradient, the gates. The
backward kernel runs time in reverse, carries dL/dh and writes the gates' pre-activation
gradients; the weights' gradients stay [T*B, H]^T [T*B, H] products outside.
Several GRUs of one shape run in one launch (programs over GRUs x row blocks). Rows are padded
to a multiple of `_ROWS` and units to a power of two >= 16 (Triton's block shapes); zero padding
leaves the real units exact. On other backends `interpret=True` runs the same kernels through
XLA (slow; tests). Products take the backend's default precision (TF32 on NVIDIA GPUs, as
XLA's and cuDNN's). Chosen by `fusion.gru_kernel="pallas"`; not yet timed on a GPU (README,
*On one H200*).
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_ROWS = 16  # sequences per program: Triton's smallest matrix-product block
# Units beyond: the weights overflow a program's shared memory (at 128 units the forward kernel
# takes 200 KB, the backward 224 KB of an H100/H200 block's 227 KB; Triton for sm_90,
# tests/test_gru_pallas.py).
MAX_UNITS = 128


def fits(units: int, frames: int = 1, rows: int = 1, grus: int = 1) -> bool:
  """Whether `grus` GRUs of `units` over [frames, rows] run as these kernels (`fusion.scan_grus`
  else takes the scan): the weights fit in shared memory, the stacked sequences' offsets in
  Triton's 32-bit integers."""
  padded_rows, padded_units = _padded_shape(rows, units)
  return padded_units <= MAX_UNITS and grus * frames * padded_rows * padded_units < 2**31


def num_warps(padded_units: int) -> int:
  """4 warps a program up to 64 units, 8 at 128 (ptxas for sm_90: the forward kernel takes 103
  registers a thread at 64 units; at 128 with 4 warps all 255, with 8 warps 172; none spill)."""
  return max(4, padded_units // 16)


def _forward_kernel(xr, xz, xn, w_hr, w_hz, w_hn, b_hn, *outs):
  """[T, rows, H] refs in, per step the state (and with 5 outputs r, z, n, W_hn h + b_hn) out.
  The weights are read once, before the loop (Triton keeps them in shared memory)."""
  w_hr, w_hz, w_hn, b_hn = w_hr[...], w_hz[...], w_hn[...], b_hn[...]

  def step(t, h):
    r = jax.nn.sigmoid(xr[t] + jnp.dot(h, w_hr))
    z = jax.nn.sigmoid(xz[t] + jnp.dot(h, w_hz))
    hn = jnp.dot(h, w_hn) + b_hn
    n = jnp.tanh(xn[t] + r * hn)
    h = (1.0 - z) * n + z * h
    for ref, value in zip(outs, (h, r, z, n, hn)):
      ref[t] = value
    return h

  jax.lax.fori_loop(0, xr.shape[0], step, jnp.zeros(outs[0].shape[1:], outs[0].dtype))


def _backward_kernel(d_hs, hs, r, z, n, hn, w_hr_t, w_hz_t, w_hn_t, dr_out, dz_out, dn_out,
                     dhn_out):
  """Back through time: dL/dh carried, the gates' pre-activation gradients written per step."""
  steps, (w_hr_t, w_hz_t, w_hn_t) = d_hs.shape[0], (w_hr_t[...], w_hz_t[...], w_hn_t[...])

  def step(i, dh):
    t = steps - 1 - i
    previous = hs[jnp.maximum(t - 1, 0)] * (t > 0).astype(dh.dtype)  # zero before the first
    r_t, z_t, n_t = r[t], z[t], n[t]
    dh = dh + d_hs[t]
    dz = dh * (previous - n_t) * z_t * (1.0 - z_t)
    dn = dh * (1.0 - z_t) * (1.0 - n_t * n_t)
    dr = dn * hn[t] * r_t * (1.0 - r_t)
    dhn = dn * r_t
    for ref, value in zip((dr_out, dz_out, dn_out, dhn_out), (dr, dz, dn, dhn)):
      ref[t] = value
    return dh * z_t + jnp.dot(dr, w_hr_t) + jnp.dot(dz, w_hz_t) + jnp.dot(dhn, w_hn_t)

  jax.lax.fori_loop(0, steps, step, jnp.zeros(dr_out.shape[1:], dr_out.dtype))


def _call(kernel, sequences: Sequence[jax.Array], matrices: Sequence[jax.Array], outputs: int,
          interpret: bool) -> list[jax.Array]:
  """`kernel` over programs (GRU, row block): `sequences` [G, T, B, H], `matrices` [G, ..., H]
  whole per GRU -> `outputs` arrays [G, T, B, H]."""
  g, t, b, h = sequences[0].shape
  seq_spec = pl.BlockSpec((None, t, _ROWS, h), lambda i, j: (i, 0, j, 0))
  whole = lambda m: pl.BlockSpec((None, *m.shape[1:]), lambda i, j: (i,) + (0,) * (m.ndim - 1))
  mat_specs = [whole(m) for m in matrices]
  shape = jax.ShapeDtypeStruct(sequences[0].shape, sequences[0].dtype)
  return pl.pallas_call(
      kernel, grid=(g, b // _ROWS), in_specs=[seq_spec] * len(sequences) + mat_specs,
      out_specs=[seq_spec] * outputs, out_shape=[shape] * outputs,
      compiler_params=plt.CompilerParams(num_warps=num_warps(h), num_stages=1),
      interpret=interpret, name=kernel.__name__.strip("_"),
  )(*sequences, *matrices)


def _padded_shape(b: int, h: int) -> tuple[int, int]:
  return -(-b // _ROWS) * _ROWS, max(16, 1 << (h - 1).bit_length())


def _pad(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _stack(arrays: Sequence[jax.Array], shape: Sequence[int]) -> jax.Array:
  return jnp.stack([_pad(a, shape) for a in arrays])


def _by_shape(run):
  """Runs `run` once per group of GRUs of one shape (one launch each) -> a tuple in GRU order."""
  @functools.wraps(run)
  def wrapper(per_gru: Sequence[tuple], *args):
    shapes = [jax.tree.leaves(x)[0].shape for x in per_gru]
    results = [None] * len(per_gru)
    for shape in dict.fromkeys(shapes):
      members = [i for i, s in enumerate(shapes) if s == shape]
      for i, result in zip(members, run([per_gru[i] for i in members], *args)):
        results[i] = result
    return tuple(results)
  return wrapper


@_by_shape
def forward(per_gru: Sequence[tuple], keep: bool, interpret: bool) -> tuple:
  """Per GRU ((xr, xz, xn) [T, B, H], (w_hr, w_hz, w_hn, b_hn)) -> its states [T, B, H], with
  `keep` (states, (r, z, n, W_hn h + b_hn)) as `fusion._run`'s."""
  t, b, h = per_gru[0][0][0].shape
  bp, hp = _padded_shape(b, h)
  xs = [_stack([x[i] for x, _ in per_gru], (t, bp, hp)) for i in range(3)]
  ws = [_stack([w[i] for _, w in per_gru], (hp, hp)) for i in range(3)]
  b_hn = _stack([w[3][None] for _, w in per_gru], (1, hp))
  outs = [o[:, :, :b, :h] for o in _call(_forward_kernel, xs, [*ws, b_hn], 5 if keep else 1,
                                          interpret)]
  return [(outs[0][g], tuple(o[g] for o in outs[1:])) if keep else outs[0][g]
          for g in range(len(per_gru))]


@_by_shape
def backward(per_gru: Sequence[tuple], interpret: bool) -> tuple:
  """Per GRU (d_hs, hs, (r, z, n, hn), (w_hr, w_hz, w_hn, _)), all [T, B, H] but the weights
  -> (dr, dz, dn, dhn) [T, B, H]: the gates' pre-activation gradients (`fusion._recur_bwd`)."""
  t, b, h = per_gru[0][0].shape
  bp, hp = _padded_shape(b, h)
  sequences = [_stack([(d, hs, *gates)[i] for d, hs, gates, _ in per_gru], (t, bp, hp))
               for i in range(6)]
  ws_t = [_stack([w[i].T for *_, w in per_gru], (hp, hp)) for i in range(3)]
  outs = [o[:, :, :b, :h] for o in _call(_backward_kernel, sequences, ws_t, 4, interpret)]
  return [tuple(o[g] for o in outs) for g in range(len(per_gru))]
