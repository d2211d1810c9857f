"""An exported model (`avemo_jax.export`), loaded and called with jax and numpy alone (plus
flatbuffers, which `jax.export.deserialize` needs).

This file is copied into every export directory as `load.py`, so an export is usable without
this package or Flax: `sys.path.insert(0, DIR); import load; model = load.load(DIR)`. An export
directory holds:

  manifest.json          kind, inputs and outputs (shapes with the symbolic batch "b" and, for
                         fusion, sequence length "t"; dtypes; meaning), preprocessing, provenance
  config.json            the training config
  variables.safetensors  the variables, '/'-joined names ("params/head/proj/kernel")
  function.jax           `jax.export`-serialised StableHLO: fn(variables, inputs) -> outputs
  model.onnx             the same function with the variables inside, where jax2onnx converts it
  load.py                this file

`model(x)` or `model(images=x)` returns {output name: array}; `model.variables` may be replaced by
other weights of the same shapes (e.g. another run's student) without re-exporting.
"""
import functools
import json
import pathlib
import struct
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST, CONFIG, VARIABLES, FUNCTION = ("manifest.json", "config.json", "variables.safetensors",
                                         "function.jax")
# safetensors dtype codes (https://github.com/huggingface/safetensors, "Format").
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


def write_safetensors(path: pathlib.Path, arrays: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Arrays in the safetensors format: u64 header size, JSON header, little-endian C-order data."""
  codes = {np.dtype(v): k for k, v in _DTYPES.items()}
  arrays = {k: np.asarray(arrays[k]) for k in sorted(arrays)}
  header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
  offset = 0
  for name, a in arrays.items():
    if a.dtype not in codes:
      raise ValueError(f"{path}: variable {name!r} has dtype {a.dtype}; safetensors takes "
                       f"{sorted(map(str, codes))}")
    header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for a in arrays.values():
      f.write(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())


def read_safetensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(arrays, metadata) of a safetensors file."""
  data = pathlib.Path(path).read_bytes()
  try:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, h in header.items():
      start, end = h["data_offsets"]
      dtype = np.dtype(_DTYPES[h["dtype"]]).newbyteorder("<")
      arrays[name] = np.frombuffer(data, dtype, (end - start) // dtype.itemsize,
                                   8 + size + start).reshape(h["shape"])
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a readable safetensors file ({e!r}); export the model "
                     "again with tools/export.py") from e
  return arrays, metadata


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


@functools.lru_cache(maxsize=16)
def _function(path: pathlib.Path, stamp: tuple[int, int]) -> tuple[Any, Callable]:
  """The serialised function at `path` and its jit, once per process while the file's (mtime,
  size) `stamp` holds: models loaded again (a video after another) reuse the compiled programs."""
  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  return exported, jax.jit(exported.call)


class Model:
  """An export directory, ready to call: `model(*inputs, **named_inputs) -> {name: array}`.

  Inputs are cast to the manifest's dtype (uint8 face pixels to float32 is exact) and their
  shapes checked against it; the function is jit-compiled once per input shape and process.
  """

  def __init__(self, directory: str | pathlib.Path, kind: str | None = None):
    self.directory = pathlib.Path(directory)
    path = self.directory / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found: give a model directory written by "
                              "tools/export.py (one holding manifest.json)")
    self.manifest: dict[str, Any] = json.loads(path.read_text())
    if kind and self.manifest.get("kind") != kind:
      examples = {"face": "EXPORT/student or EXPORT/teacher", "audio": "EXPORT/audio",
                  "fusion": "EXPORT/fusion/fused, /audio or /visual"}
      raise ValueError(f"{self.directory} is an export of kind {self.manifest.get('kind')!r} "
                       f"({self.manifest.get('name')}); a {kind!r} model is needed here: give "
                       f"{examples.get(kind, 'another export')}")
    flat, _ = read_safetensors(self.directory / VARIABLES)
    self.variables = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    function = (self.directory / FUNCTION).resolve()
    stat = function.stat()
    self.exported, self._call = _function(function, (stat.st_mtime_ns, stat.st_size))

  @property
  def config(self) -> dict[str, Any]:
    """The training config, as plain JSON."""
    return json.loads((self.directory / CONFIG).read_text())

  def __call__(self, *args, **kwargs) -> dict[str, jax.Array]:
    specs = self.manifest["inputs"]
    names = [s["name"] for s in specs]
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
      raise TypeError(f"{self.directory}: the model takes the inputs {names}; got "
                      f"{len(args)} positional and {sorted(kwargs)}")
    given = {**dict(zip(names, args)), **kwargs}
    inputs, sizes = {}, {}
    for spec in specs:
      if spec["name"] not in given:
        raise TypeError(f"{self.directory}: input {spec['name']!r} is missing ({spec['meaning']})")
      x = np.asarray(given[spec["name"]], spec["dtype"])
      # A symbolic dimension ("b", "t") takes its size from the first input that has it.
      expected = [sizes.setdefault(d, n) if isinstance(d, str) else d
                  for d, n in zip(spec["shape"], x.shape)]
      if x.ndim != len(spec["shape"]) or list(x.shape) != expected:
        raise ValueError(f"{self.directory}: input {spec['name']!r} has shape {x.shape}; the "
                         f"model takes {spec['shape']} ({spec['meaning']})")
      inputs[spec["name"]] = x
    return self._call(self.variables, inputs)


def load(directory: str | pathlib.Path, kind: str | None = None) -> Model:
  """The exported model in `directory` (a folder holding manifest.json); with `kind` ("face",
  "audio", "fusion"), an export of another kind is refused by name."""
  return Model(directory, kind)
