"""ONNX versions of exported functions (optional extra `.[onnx]`: jax2onnx + onnxruntime).

The function is traced to a jaxpr with the variables as constants (they become ONNX
initializers) and symbolic batch / sequence dimensions, converted by jax2onnx, and checked against
JAX with onnxruntime. Two things are worked around: jax2onnx's patched `flax.linen.max_pool`
takes the window by keyword only (our models pass it positionally), so the jaxpr is traced here,
outside its patches; and it lowers `lax.reduce_window_max` to a 4-D MaxPool that onnxruntime
rejects, so NHWC max pooling is rewritten as the maximum of strided slices (exact).
"""
import functools
import importlib.util
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

TOLERANCE = 1e-4  # largest |onnxruntime - JAX| accepted on the check inputs


def convert(path: pathlib.Path, fn: Callable, specs: dict[str, jax.ShapeDtypeStruct],
            output_names: list[str], check_inputs: dict[str, np.ndarray], *,
            mode: str = "auto") -> dict[str, Any]:
  """Writes `fn({input: array}) -> {output: array}` to `path` as ONNX and checks it on
  `check_inputs`; returns the outcome for the manifest. mode "auto" records a failure (and
  removes the file), "on" raises it, "off" does nothing."""
  if mode == "off":
    return {"status": "not requested"}
  if not (importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime")):
    if mode == "on":
      raise ImportError("ONNX export needs jax2onnx and onnxruntime: pip install '.[onnx]'")
    return {"status": "skipped: jax2onnx / onnxruntime not installed (pip install '.[onnx]')"}
  import jax2onnx
  import onnxruntime
  names = list(specs)
  try:
    flat_fn = lambda *xs: [fn(dict(zip(names, xs)))[o] for o in output_names]
    closed = jax.make_jaxpr(flat_fn)(*specs.values())
    proto = jax2onnx.to_onnx(lambda *xs: _interpret(closed, *xs), list(specs.values()),
                             model_name=path.parent.name, input_names=names,
                             output_names=output_names)
    path.write_bytes(proto.SerializeToString())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = jax.jit(fn)(check_inputs)
    got = session.run(output_names, check_inputs)
    diff = max(float(np.max(np.abs(g - np.asarray(want[o])))) for g, o in zip(got, output_names))
    if not diff <= TOLERANCE:
      raise ValueError(f"onnxruntime differs from JAX by {diff:.3g} > {TOLERANCE}")
  except Exception as e:  # a layer jax2onnx or onnxruntime cannot express: recorded, not fatal
    if mode == "on":
      raise
    path.unlink(missing_ok=True)
    logging.warning("%s: no ONNX model: %r", path, e)
    return {"status": f"failed: {type(e).__name__}: {str(e)[:400]}"}
  shapes = {k: list(v.shape) for k, v in check_inputs.items()}
  return {"status": "converted", "file": path.name, "opset": proto.opset_import[0].version,
          "max_abs_diff": diff, "checked": f"onnxruntime vs JAX on random inputs {shapes}"}


def _slice_max_pool(x: jax.Array, window, strides, padding) -> jax.Array:
  """NHWC max pooling as the maximum of strided slices."""
  if window[0] != 1 or window[-1] != 1 or strides[0] != 1 or strides[-1] != 1:
    raise NotImplementedError(f"max pooling over batch or channels: window {window}")
  if any(lo or hi for lo, hi in padding):
    x = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  (kh, kw), (sh, sw) = window[1:3], strides[1:3]
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  parts = [jax.lax.slice(x, (0, i, j, 0),
                         (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3]),
                         (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return functools.reduce(jnp.maximum, parts)


def _interpret(closed: jax_core.ClosedJaxpr, *args) -> list[jax.Array]:
  """Evaluates a jaxpr, with its top-level max pooling rewritten by `_slice_max_pool`."""
  env: dict[Any, Any] = dict(zip(closed.jaxpr.constvars, closed.consts))
  env.update(zip(closed.jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  for eqn in closed.jaxpr.eqns:
    ins, p = [read(v) for v in eqn.invars], eqn.params
    if eqn.primitive.name == "reduce_window_max" and len(ins[0].shape) == 4 and (
        set(p["window_dilation"]) == set(p["base_dilation"]) == {1}):
      outs = [_slice_max_pool(ins[0], p["window_dimensions"], p["window_strides"], p["padding"])]
    else:
      outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(p))
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in closed.jaxpr.outvars]
