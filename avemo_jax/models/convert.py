"""Pretrained weights in: torch state dicts -> Flax variables of our trunk and audio encoder.

`facenet_from_torch`: facenet-pytorch 2.6 `InceptionResnetV1` (e.g. 20180402-114759-vggface2.pt)
-> `inception_resnet.InceptionResnetV1` up to its cut; `vggish_from_torch`: torchvggish `VGG`
(vggish-10086976.pth) -> `audio.VGGish` without our valence/arousal head. State dicts map torch
key names to NumPy arrays; only `read_torch` (tools/convert_*.py) imports torch.

Layouts: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); linear (out, in) -> (in, out);
BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var,
num_batches_tracked dropped. Nothing else needs changing: the trunk pads symmetrically as torch
does (never "SAME" on its stride-2 convs) with BatchNorm eps 1e-3; VGGish's 3x3/1 convs with
padding 1 are "SAME", and torchvggish transposes to NHWC before flattening for the first fully
connected layer, which is our flatten order. Keys beyond the trunk's cut (repeat_3/block8 at
mixed_7a; avgpool/last_linear/last_bn/logits always) and VGGish's PCA post-processing
(`pproc.*`, `pca_*`: we use the raw 128-d embedding) are ignored.
"""
import collections
import hashlib
import json
import pathlib
import pickle
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from avemo_jax.models import audio, inception_resnet

StateDict = dict[str, np.ndarray]
_WRAPPERS = ("module.", "_orig_mod.")  # key prefixes of a wrapped model's state dict
_FACENET_HEADS = ("avgpool_1a", "dropout", "last_linear", "last_bn", "logits")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_TORCH_FILES = ("facenet-pytorch's 20180402-114759-vggface2.pt (tools/convert_facenet.py) or "
                "torchvggish's vggish-10086976.pth (tools/convert_vggish.py)")
_PCA = ("torchvggish's PCA parameters file (vggish_pca_params-970ea276.pth): the converter reads "
        "the network weights, vggish-10086976.pth, not PCA (our VGGish uses the raw embedding)")


def _flat(variables: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(variables, sep="/")


def _listed(items: list[str], n: int) -> list[str]:
  """The first `n` of `items` and a count of the rest: errors stay readable for any file."""
  return items[:n] + [f"... and {len(items) - n} more"] * (len(items) > n)


def _check(expected: dict[str, Any], got: dict[str, Any], what: str, fix: str,
           names: dict[str, str] | None = None) -> None:
  """Raises counting the misshapen, missing and unexpected leaves of `got` against `expected`
  and naming about 10 of them, params (kernels say more than statistics) first."""
  names = names or {}
  name = lambda k: f"{names[k]} -> {k}" if k in names else k
  order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))
  shapes = [f"shape: {name(k)} is {tuple(got[k].shape)}, the model has "
            f"{tuple(expected[k].shape)}" for k in order(got.keys() & expected)
            if tuple(got[k].shape) != tuple(expected[k].shape)]
  missing = [f"missing: {k} {tuple(expected[k].shape)}" for k in order(expected.keys() - got)]
  unexpected = [f"unexpected: {name(k)} {tuple(got[k].shape)}"
                for k in order(got.keys() - expected)]
  groups = [g for g in (shapes, missing, unexpected) if g]
  if groups:
    lines = [line for g in groups for line in _listed(g, 10 // len(groups))]
    raise ValueError(f"{what} does not fit the model: {len(shapes)} shapes differ, {len(missing)} "
                     f"missing, {len(unexpected)} unexpected. {fix}\n  " + "\n  ".join(lines))


def _model_of(keys: Collection[str]) -> str:
  """Which torch model a state dict with these keys is from, and what to do with it."""
  tops = collections.Counter(k.split(".")[0] for k in keys)
  if "conv2d_1a" in tops:
    return ("facenet-pytorch's InceptionResnetV1 (conv2d_1a.*): convert it with "
            "tools/convert_facenet.py")
  if tops.keys() & {"features", "embeddings"}:
    return ("torchvggish's VGGish (features.*, embeddings.*): convert it with "
            "tools/convert_vggish.py")
  if tops and all(_vggish_ignored(k) for k in keys):
    return _PCA
  names = _listed([f"{t}.* ({n})" for t, n in tops.most_common()], 10) or ["none"]
  return (f"neither facenet-pytorch's nor torchvggish's (top-level names: {', '.join(names)}): "
          f"give {_TORCH_FILES}")


def _convert(state_dict: StateDict, path_of: Callable[[str], str | None],
             expected: dict[str, Any], what: str, fix: str) -> dict[str, Any]:
  """Maps every kept torch key to `collection/flax/path`, transposes kernels, checks shapes."""
  got, names = {}, {}
  for key, value in state_dict.items():
    path = path_of(key)
    if path is None:
      continue
    value = np.asarray(value)
    # conv (O, I, kh, kw) -> (kh, kw, I, O); linear (out, in) -> (in, out)
    if path.endswith("/kernel") and value.ndim in (2, 4):
      value = value.transpose((2, 3, 1, 0) if value.ndim == 4 else (1, 0))
    got[path], names[path] = value, key
  found = len(got.keys() & expected)
  if found < len(expected) / 10:  # another model's file: a size fix and a key list would mislead
    raise ValueError(f"{what} does not fit the model: it has {found} of the model's "
                     f"{len(expected)} weight arrays; its keys look like {_model_of(state_dict)}")
  _check(expected, got, what, fix, names)
  converted = {k: np.ascontiguousarray(v, dtype=expected[k].dtype) for k, v in got.items()}
  return traverse_util.unflatten_dict(converted, sep="/")


def _facenet_ignored(key: str, cut: str) -> bool:
  """Whether a facenet-pytorch key has no counterpart in a trunk cut at `cut`."""
  top = key.split(".")[0]
  return (key.endswith("num_batches_tracked") or top in _FACENET_HEADS
          or (cut == "mixed_7a" and top in ("repeat_3", "block8")))


def _facenet_path(key: str) -> str:
  """`repeat_1.3.branch1.0.bn.running_var` -> `batch_stats/repeat_1/block_3/branch1_0/bn/var`."""
  *modules, leaf = key.split(".")
  names: list[str] = []
  for m in modules:
    if m.isdigit() and names:  # Sequential child: repeat_k.N -> block_N, branchK.N -> branchK_N
      names[-1] += f"/block_{m}" if names[-1].startswith("repeat_") else f"_{m}"
    else:
      names.append(m)
  collection, name = (_BN[leaf] if modules[-1:] == ["bn"] and leaf in _BN
                      else ("params", {"weight": "kernel"}.get(leaf, leaf)))
  return f"{collection}/{'/'.join(names)}/{name}"


def facenet_from_torch(state_dict: StateDict,
                       model: inception_resnet.InceptionResnetV1 | None = None, *,
                       what: str = "facenet state dict") -> dict[str, Any]:
  """facenet-pytorch `InceptionResnetV1` state dict -> variables of `model` (default: the full
  trunk cut at mixed_7a); raises naming every key or shape that does not fit."""
  model = model or inception_resnet.InceptionResnetV1()
  expected = _flat(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 160, 160, 3)), train=False)))
  fix = ("facenet-pytorch weights have width 1.0 and depth (5, 10, 5): convert them for a "
         f"trunk with those (this one: width={model.width}, depth={tuple(model.depth)}).")
  path_of = lambda k: None if _facenet_ignored(k, model.cut) else _facenet_path(k)
  return _convert(state_dict, path_of, expected, what, fix)


def _vggish_ignored(key: str) -> bool:
  """Whether a torchvggish key has no counterpart in our VGGish (its PCA post-processing)."""
  return key.startswith("pproc.") or key.split(".")[-1] in ("pca_eigen_vectors", "pca_means")


def _vggish_names() -> dict[str, str]:
  """torchvggish module -> ours: features.{0,3,6,8,11,13} (conv, ReLU [, pool] per conv) and
  embeddings.{0,2,4} (Linear, ReLU each)."""
  names, i = {}, 0
  for block, convs, _ in audio.BLOCKS:
    for c in range(convs):
      names[f"features.{i}"] = block if convs == 1 else f"{block}_{c + 1}"
      i += 2
    i += 1  # MaxPool2d
  names.update({f"embeddings.{2 * j}": fc for j, fc in enumerate(("fc1_1", "fc1_2", "fc2"))})
  return names


def vggish_from_torch(state_dict: StateDict, model: audio.VGGish | None = None, *,
                      what: str = "vggish state dict") -> dict[str, Any]:
  """torchvggish state dict -> variables of `model` (default: full VGGish) without `va_head`,
  which stays at its initialisation; raises naming every key or shape that does not fit."""
  model = model or audio.VGGish()
  expected = _flat(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, audio.NUM_FRAMES, audio.NUM_BANDS)))))
  expected = {k: v for k, v in expected.items() if not k.startswith("params/va_head/")}
  names = _vggish_names()

  def path_of(key: str) -> str | None:
    module, _, leaf = key.rpartition(".")
    return None if _vggish_ignored(key) else (
        f"params/{names.get(module, module)}/{'kernel' if leaf == 'weight' else leaf}")

  fix = (f"torchvggish weights are full size: convert them for width=1.0, fc_dim=4096, "
         f"embed_dim=128 (this model: width={model.width}, fc_dim={model.fc_dim}, "
         f"embed_dim={model.embed_dim}).")
  return _convert(state_dict, path_of, expected, what, fix)


def read_torch(path: str | pathlib.Path) -> StateDict:
  """A torch state dict file (or a training checkpoint's "state_dict" or "model" entry) as NumPy
  arrays; needs torch: pip install -e '.[convert]'. Raises naming the file and the fix."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch: pip install -e '.[convert]'") from e
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"{path} is a folder: give the weights file itself, {_TORCH_FILES}")
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: give the downloaded weights, {_TORCH_FILES}")
  with open(path, "rb") as f:
    head = f.read(4)
  tf_name = ".ckpt" in path.name or ".data-0" in path.name or path.suffix in (".index", ".meta")
  # torch writes a zip or (before 1.6) pickles; Lightning's .ckpt files are torch zips
  if head != b"PK\x03\x04" and (tf_name or head[:1] != b"\x80"):
    raise ValueError(
        f"{path} is a TensorFlow checkpoint, which the converters do not read: convert "
        f"{_TORCH_FILES} instead" if tf_name else
        f"{path} is not a torch file (neither a zip nor a pickle): re-download it; TensorFlow "
        f"checkpoints are not supported, convert {_TORCH_FILES} instead")
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:  # an object weights_only refuses to build
    if "numpy" in str(e):  # torchvggish's PCA file is a dict of NumPy arrays
      raise ValueError(f"{path} holds NumPy arrays, not tensors: it looks like {_PCA}") from e
    raise ValueError(f"{path} holds objects other than tensors, which safe loading (torch.load "
                     f"with weights_only=True) refuses: give {_TORCH_FILES}, or save "
                     "model.state_dict() instead of the model") from e
  except (RuntimeError, EOFError, OSError) as e:  # a truncated zip or pickle
    raise ValueError(f"{path} is not a complete torch state dict (torch cannot read it): "
                     "re-download it") from e
  where = path
  for entry in ("state_dict", "model"):  # a training checkpoint keeps the weights in one entry
    if isinstance(loaded, dict) and isinstance(loaded.get(entry), dict):
      loaded, where = loaded[entry], f"{path}[{entry!r}]"
      break
  if not isinstance(loaded, dict):
    raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (name -> tensor): "
                     f"give {_TORCH_FILES}, or save model.state_dict()")
  others = [f"{k!r} ({type(v).__name__})" for k, v in loaded.items()
            if not isinstance(v, torch.Tensor)]
  if others and all(_vggish_ignored(k) for k in loaded):
    raise ValueError(f"{path} is {_PCA}")
  if others:
    raise ValueError(f"{where} is not a state dict: {len(others)} of its {len(loaded)} entries are "
                     f"not tensors ({', '.join(_listed(others, 10))}): give "
                     f"{_TORCH_FILES}, or save model.state_dict()")
  # (Distributed)DataParallel saves `module.<key>`, torch.compile `_orig_mod.<key>`: unwrap.
  wrapped = lambda prefix: loaded and all(k.startswith(prefix) for k in loaded)
  while wrap := next(filter(wrapped, _WRAPPERS), None):
    loaded = {k[len(wrap):]: v for k, v in loaded.items()}
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in loaded.items()}


def convert_file(kind: str, source: str | pathlib.Path, output: str | pathlib.Path, *,
                 cut: str = "mixed_7a") -> dict[str, Any]:
  """tools/convert_{kind}.py: converts a torch state dict file for the full-size trunk (cut at
  `cut`) or VGGish, `save`s it to `output` and returns what conversion.json records."""
  _fresh(output)  # before the work
  state_dict = read_torch(source)
  with open(source, "rb") as f:
    digest = hashlib.file_digest(f, "sha256").hexdigest()
  if kind == "facenet":
    model = inception_resnet.InceptionResnetV1(cut=cut)
    variables = facenet_from_torch(state_dict, model, what=str(source))
    ignored = [k for k in state_dict if _facenet_ignored(k, cut)]
    fields = {"cut": cut, "width": model.width, "depth": list(model.depth)}
  elif kind == "vggish":
    model = audio.VGGish()
    variables = vggish_from_torch(state_dict, model, what=str(source))
    ignored = [k for k in state_dict if _vggish_ignored(k)]
    fields = {"width": model.width, "fc_dim": model.fc_dim, "embed_dim": model.embed_dim}
  else:
    raise ValueError(f"kind must be 'facenet' or 'vggish', got {kind!r}")
  groups = collections.Counter(  # ignored keys per torch module
      "num_batches_tracked" if k.endswith("num_batches_tracked") else k.split(".")[0]
      for k in ignored)
  info = {"kind": kind, "source": str(pathlib.Path(source).absolute()), "sha256": digest,
          "model": fields, "torch_keys": len(state_dict), "ignored_keys": dict(groups),
          "converted_leaves": {c: len(_flat(t)) for c, t in variables.items()},
          "parameters": {c: int(sum(np.size(v) for v in _flat(t).values()))
                         for c, t in variables.items()}}
  save(output, variables, info)
  return info


def _fresh(directory: str | pathlib.Path) -> pathlib.Path:
  directory = pathlib.Path(directory).absolute()
  if (directory / "variables").exists():
    raise FileExistsError(f"{directory / 'variables'} exists: remove it or choose another output")
  return directory


def save(directory: str | pathlib.Path, variables: dict[str, Any], info: dict[str, Any]) -> None:
  """Writes DIR/variables (an Orbax checkpoint) and DIR/conversion.json (`info`: "kind",
  "facenet" or "vggish", and what was converted)."""
  directory = _fresh(directory)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "variables", variables)
  checkpointer.wait_until_finished()
  (directory / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")


def load(directory: str | pathlib.Path, kind: str, what: str) -> tuple[dict[str, Any], dict]:
  """(variables, conversion.json) of a `save`d conversion of `kind` ("facenet" or "vggish");
  `what` (the config key) names the setting in errors."""
  directory = pathlib.Path(directory).absolute()
  info_path = directory / "conversion.json"
  if not info_path.is_file() or not (directory / "variables").is_dir():
    raise FileNotFoundError(f"{what}={str(directory)!r}: no conversion.json and variables/ there; "
                            f"write them with tools/convert_{kind}.py --output={directory}")
  info = json.loads(info_path.read_text())
  if info.get("kind") != kind:
    raise ValueError(f"{what}={str(directory)!r} holds {info.get('kind')!r} weights, not "
                     f"{kind!r}: give the output of tools/convert_{kind}.py")
  return ocp.StandardCheckpointer().restore(directory / "variables"), info


def graft(variables: dict[str, Any], converted: dict[str, Any], *, at: tuple[str, ...] = (),
          keep: tuple[str, ...] = (), what: str, fix: str) -> dict[str, Any]:
  """`variables` with the subtree `at` of every collection taken from `converted`; only the
  subtree's top-level entries named in `keep` may be absent there (they stay as they are)."""
  flat = traverse_util.flatten_dict(variables)
  inside = lambda k: k[1:len(at) + 1] == at and k[len(at) + 1] not in keep
  got = {k[:1] + at + k[1:]: v for k, v in traverse_util.flatten_dict(converted).items()}
  _check({"/".join(k): v for k, v in flat.items() if inside(k)},
         {"/".join(k): v for k, v in got.items()}, what, fix)
  flat.update({k: jnp.asarray(v, flat[k].dtype) for k, v in got.items()})
  return traverse_util.unflatten_dict(flat)
