"""ONNX versions of exported functions (optional extra `.[onnx]`: jax2onnx + onnxruntime).

The function is traced to a jaxpr with the variables as constants (they become ONNX
initializers) and symbolic batch / sequence dimensions, converted by jax2onnx, and checked against
JAX with onnxruntime. It is traced under `layers.portable()` (plain convolutions, max pooling as
strided slices: no `platform_dependent`, and no 4-D reduce-window, whose jax2onnx MaxPool
onnxruntime rejects), and outside jax2onnx's Flax patches (its patched `flax.linen` layers take
arguments differently from ours): jax2onnx converts the jaxpr's primitives.
"""
import importlib.util
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
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

  from avemo_jax.models import layers  # here: `avemo_jax.export.load` must not import Flax
  names = list(specs)
  try:
    flat_fn = lambda *xs: [fn(dict(zip(names, xs)))[o] for o in output_names]
    with layers.portable():
      closed = jax.make_jaxpr(flat_fn)(*specs.values())
    proto = jax2onnx.to_onnx(jax_core.jaxpr_as_fun(closed), list(specs.values()),
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
