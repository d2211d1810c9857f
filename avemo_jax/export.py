"""Exports the trained models of a workdir, one self-contained directory each (files: see
`avemo_jax.exported`), and loads them back (`load`, with jax and numpy alone).

  OUT/teacher, OUT/student   face network: images [b, S, S, 3] -> logits, feature, embedding
  OUT/audio                  VGGish: log-mel [b, 96, 64] -> valence/arousal, embedding
  OUT/fusion/<model>         GRU: raw per-frame features [b, t, D], lengths [b] -> [b, t, 2]

The StableHLO function takes the variables as an argument instead of baking them in as
constants: the weights are stored once (safetensors, readable by any framework) rather than twice,
the function file stays a few hundred kB whatever the model size, and weights of the same
architecture can be swapped without exporting again. It is lowered for CPU, CUDA, ROCm and TPU.

ONNX (optional extra `.[onnx]`, `avemo_jax.export_onnx`): the same computation with the variables
inside, checked against JAX with onnxruntime; the manifest records the largest difference or why
the conversion failed.

Model code (Flax) is imported inside the export functions only: `load` must work without it.
"""
import functools
import json
import logging
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avemo_jax import export_onnx, exported
from avemo_jax.exported import Model, load  # noqa: F401  (the loader, re-exported)

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FACE_STAGES, FUSION_MODELS = ("teacher", "student"), ("audio", "visual", "fused")
# The stage that reads config.<model>_checkpoint when it does not train <model> itself.
_READERS = {"teacher": "student", "student": "fusion", "audio": "fusion"}
Fn = Callable[[dict[str, Any], dict[str, jax.Array]], dict[str, jax.Array]]


def _io(name: str, shape: tuple, dtype: str, meaning: str) -> dict[str, Any]:
  return {"name": name, "shape": list(shape), "dtype": dtype, "meaning": meaning}


def _steps(stage_dir: pathlib.Path) -> list[int]:
  ckpt = stage_dir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _restore(stage_dir: pathlib.Path, model, stage_cfg, inputs) -> dict[str, Any]:
  from avemo_jax.train import state as state_lib
  from avemo_jax.train.checkpoint import load_variables
  template = jax.eval_shape(lambda: state_lib.create(model, stage_cfg, jax.random.key(0), inputs))
  return jax.tree.map(np.asarray, load_variables(str(stage_dir), template, "export"))


def _face(config, stage_dir: pathlib.Path, name: str):
  from avemo_jax.data import synthetic
  from avemo_jax.train import build
  size, m = config.data.image_size, config.model
  model = build.face_model(m, dtype=config.dtype)
  variables = _restore(stage_dir, model, config[name], build.face_inputs(size))

  def fn(variables, inputs):
    logits, aux = model.apply(variables, inputs["images"], train=False)
    return {"logits": logits, "feature": aux["feature"], "embedding": aux["embedding"]}

  classes = list(synthetic.EXPRESSIONS[:m.num_classes])
  inputs = [_io("images", ("b", size, size, 3), "float32",
                "RGB face crops, pixel values 0-255 (uint8 is cast exactly)")]
  outputs = [_io("logits", ("b", m.num_classes), "float32", f"expression logits: {classes}"),
             _io("feature", ("b", m.feature_dim), "float32", "the face feature (fusion input)"),
             _io("embedding", ("b", m.embed_dim), "float32",
                 "unit-norm FEC expression embedding (closer: more similar expressions)")]
  info = {"kind": "face", "classes": classes, "preprocessing": {
      "crop_size": size, "crop_margin": config.data.crop_margin,
      "crop": "square around the face box, side max(w, h) * (1 + 2 * crop_margin), resized with "
              "PIL bicubic (avemo_jax.data.faces.crop)",
      "pixels": "RGB 0-255; (x - 127.5) / 128 is applied inside the function"}}
  return fn, variables, inputs, outputs, info


def _audio(config, stage_dir: pathlib.Path):
  from avemo_jax.data import audio_features as af
  from avemo_jax.train import build
  model = build.audio_model(config.audio, dtype=config.dtype)
  variables = _restore(stage_dir, model, config.audio.train, build.audio_inputs())

  def fn(variables, inputs):
    va, aux = model.apply(variables, inputs["mel"])
    return {"valence_arousal": va, "embedding": aux["embedding"]}

  inputs = [_io("mel", ("b", af.NUM_FRAMES, af.NUM_BANDS), "float32",
                "log-mel examples of 0.96 s (preprocessing)")]
  outputs = [_io("valence_arousal", ("b", 2), "float32", "clip valence and arousal"),
             _io("embedding", ("b", config.audio.embed_dim), "float32",
                 "the audio embedding (fusion input)")]
  info = {"kind": "audio", "preprocessing": {
      "sample_rate": af.SAMPLE_RATE, "mono": True, "stft_window_seconds": af.STFT_WINDOW_SECONDS,
      "window": "periodic Hann", "stft_hop_seconds": af.STFT_HOP_SECONDS,
      "fft_length": af.FFT_LENGTH, "spectrum": "magnitude", "mel_bands": af.NUM_BANDS,
      "mel_scale": "HTK", "mel_min_hz": af.MEL_MIN_HZ, "mel_max_hz": af.MEL_MAX_HZ,
      "log": f"log(mel + {af.LOG_OFFSET})", "example_frames": af.NUM_FRAMES,
      "reference": "VGGish vggish_input.waveform_to_examples; here "
                   "avemo_jax.data.audio_features.waveform_to_examples"}}
  return fn, variables, inputs, outputs, info


def _statistics(cache: pathlib.Path, modalities) -> tuple[dict[str, Any], dict[str, Any]]:
  """Standardisation statistics of the training features (`features.statistics`, as
  `features.standardize` uses them) and the cache's key (it names the extractors' fingerprints)."""
  if not cache.is_file():
    raise FileNotFoundError(
        f"{cache} not found: a fusion export takes the training features' standardisation "
        "statistics from it. Rerun the fusion stage (--config.stages='(\"fusion\",)' with "
        "--config.student_checkpoint and --config.audio_checkpoint) to write it.")
  from avemo_jax.train import features
  with np.load(cache) as f:
    split = {k: f[k] for k in (*modalities, "labels", "lengths")}
    return features.statistics(split, modalities), json.loads(str(f["key"]))


def _fusion(config, workdir: pathlib.Path, name: str):
  from avemo_jax.train import av_stages, build
  modalities = av_stages.MODEL_MODALITIES[name]
  dims = {"visual": config.model.feature_dim, "audio": config.audio.embed_dim}
  model = build.fusion_model(config.fusion, modalities)
  variables = _restore(workdir / "fusion" / name, model, config.fusion.train,
                       build.fusion_inputs({m: dims[m] for m in modalities}))
  stats, key = _statistics(workdir / "fusion" / "features_train.npz", modalities)

  def fn(variables, inputs):
    lengths = inputs["lengths"]
    feats = {}
    for m in modalities:  # as features.standardize: statistics of the training frames
      x, s = inputs[m], variables["standardize"][m]
      valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
      feats[m] = jnp.where(valid, (x - s["mean"]) / s["std"], 0.0)
    return {"valence_arousal": model.apply({"params": variables["params"]}, feats, lengths)[0]}

  source = {"visual": "the student export's `feature` of the frame's face crop",
            "audio": "the audio export's `embedding` of the 0.96 s log-mel window centred on the "
                     "frame's middle: audio_features.examples_at(log_mel, (t + 0.5) / 25)"}
  inputs = [_io(m, ("b", "t", dims[m]), "float32", f"raw per-frame features (25 Hz): {source[m]}")
            for m in modalities]
  inputs.append(_io("lengths", ("b",), "int32", "valid frames per sequence (the rest is padding)"))
  outputs = [_io("valence_arousal", ("b", "t", 2), "float32",
                 "per-frame valence and arousal; frames t >= lengths are padding")]
  info = {"kind": "fusion", "modalities": list(modalities), "preprocessing": {
      "frame_rate_hz": 25, "standardisation": "inside the function: (x - mean) / std with the "
      "training frames' statistics (variables standardize/<modality>/{mean,std}); frames "
      "t >= lengths are set to 0",
      # source.fingerprint of the student and audio exports whose features it was trained on
      "extractor_fingerprints": {"visual": key["student"], "audio": key["audio"]}}}
  return fn, {**variables, "standardize": stats}, inputs, outputs, info


def workdir_config(workdir: str | pathlib.Path):
  """The config a workdir was last trained with (WORKDIR/config.json, written by every run)."""
  import ml_collections
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a training --workdir? (Runs before "
                            "config.json was written: give --config with the training overrides)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _stage_configs(workdir: pathlib.Path, config) -> Callable[[str], Any]:
  """stage -> the config of the run that trained it (WORKDIR/<stage>/config.json; before those
  were written, WORKDIR/config.json), or `config` for every stage where one is given."""
  import ml_collections
  if config is not None:
    return lambda stage: config
  latest = workdir_config(workdir)

  @functools.cache  # asked for once per model and once per model it read
  def of(stage: str):
    path = workdir / stage.split("/")[0] / "config.json"
    return (ml_collections.ConfigDict(json.loads(path.read_text())) if path.is_file()
            else latest)
  return of


def export_workdir(config, workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                   onnx: str = "auto") -> dict[str, pathlib.Path]:
  """Exports every trained model of `workdir` to OUT/<name>, and the models its run read from
  other checkpoints instead of training them (`_reused_sources`), from those checkpoints.

  `config`: the one the workdir was trained with; None reads the config each stage was trained
  with (WORKDIR/<stage>/config.json): later runs in the workdir do not change what is exported.
  `onnx`: "auto" (convert where jax2onnx is installed), "on" (it must be) or "off".
  Returns {name: directory}.
  """
  if onnx not in ("auto", "on", "off"):
    raise ValueError(f"onnx={onnx!r}: choose 'auto', 'on' or 'off'")
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  config_of = _stage_configs(workdir, config)
  stages = {n: workdir / n for n in (*FACE_STAGES, "audio")}
  stages.update({f"fusion/{m}": workdir / "fusion" / m for m in FUSION_MODELS})
  found = {n: d for n, d in stages.items() if _steps(d)}
  if not found:
    raise FileNotFoundError(
        f"{workdir} holds no trained model: no checkpoint in {workdir}/<stage>/checkpoints for "
        f"any of {list(stages)}. Train first: python -m avemo_jax.main --config=... "
        f"--workdir={workdir}")
  # Restored and checked before anything is written: a bad source leaves the export as it was.
  reused = {name: _reused(config_of(_READERS[name]), workdir, name, key)
            for name, key in _reused_sources(config_of, found).items()}
  for name, (stage_dir, _) in reused.items():
    if name in found and found[name].resolve() != stage_dir.resolve():
      logging.warning("export: %s not exported: the run read its %s from %s (config.%s_checkpoint)",
                      found[name], name, stage_dir, name)
  from avemo_jax.train import features
  written = {}
  for name in [n for n in stages if n in found or n in reused]:
    config = config_of(_READERS[name] if name in reused else name)
    if name in reused:
      stage_dir, (fn, variables, inputs, outputs, info) = reused[name]
      source = {"workdir": str(stage_dir.parent.resolve()), "stage": stage_dir.name,
                "read_by": {"workdir": str(workdir.resolve()), "stage": _READERS[name],
                            "config": f"{name}_checkpoint"}}
    else:
      stage_dir, source = found[name], {"workdir": str(workdir.resolve()), "stage": name}
      fn, variables, inputs, outputs, info = _parts(config, workdir, name, stage_dir)
    model_vars = {k: v for k, v in variables.items() if k != "standardize"}
    info["source"] = {**source, "step": _steps(stage_dir)[-1],
                      "fingerprint": features.fingerprint(model_vars)}
    _write(out / name, name, fn, variables, inputs, outputs, info, config, onnx)
    logging.info("export: %s -> %s", name, out / name)
    written[name] = out / name
  return written


def _parts(config, workdir: pathlib.Path, name: str, stage_dir: pathlib.Path):
  """(fn, variables, inputs, outputs, info) of model `name` from the checkpoints in `stage_dir`."""
  if name in FACE_STAGES:
    return _face(config, stage_dir, name)
  if name == "audio":
    return _audio(config, stage_dir)
  return _fusion(config, workdir, name.split("/")[1])


def _reused_sources(config_of: Callable[[str], Any], found) -> dict[str, str]:
  """{model: config key} of the models the runs read from config.<model>_checkpoint, where the
  stage that read it (`_READERS`) is among `found` (this workdir's trained models) and
  `config_of(stage)` is the config it was trained with. As stages._visual_stages and
  av_stages.run: a teacher_checkpoint is read even with "teacher" in config.stages; a student or
  audio checkpoint only when that stage did not run."""
  out = {}
  for name, reader in _READERS.items():
    key, config = f"{name}_checkpoint", config_of(reader)
    trained = name in config.stages and name != "teacher"
    if (config[key] and reader in config.stages and not trained
        and any(n.split("/")[0] == reader for n in found)):
      out[name] = key
  return out


def _recorded(workdir: pathlib.Path, name: str) -> str:
  """The fingerprint of the `name` weights the run read, as the stage that read them recorded it:
  the student's trained_from.json (its teacher), the fusion feature cache's key (the extractors,
  which the fusion exports' extractor_fingerprints repeat)."""
  from avemo_jax.train import provenance
  path = (workdir / "student" / provenance.FILE if name == "teacher"
          else workdir / "fusion" / "features_train.npz")
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: it records which {name} the run in {workdir} read; "
                            f"rerun its {_READERS[name]} stage")
  if name == "teacher":
    return json.loads(path.read_text())["teacher"]
  with np.load(path) as f:
    return json.loads(str(f["key"]))[name]


def _reused(config, workdir: pathlib.Path, name: str, key: str):
  """(stage directory, export parts) of `name` from config.`key`, refused unless it still holds the
  weights the run read."""
  from avemo_jax.train import features
  path = pathlib.Path(config[key])
  stage_dir = path.parent if path.name == "checkpoints" else path
  reader = _READERS[name]
  what = f"{path} (config.{key} of {workdir}: its {reader} stage read the {name} there)"
  fix = (f"put that checkpoint back (a relative path is taken from the current directory), or "
         f"rerun the {reader} stage in {workdir} on a {name} that exists")
  if not _steps(stage_dir):
    raise FileNotFoundError(f"{what} holds no checkpoint any more: {fix}")
  want = _recorded(workdir, name)
  parts = _parts(config, workdir, name, stage_dir)
  got = features.fingerprint(parts[1])
  if got != want:
    raise ValueError(f"{what} has changed since: its weights are {got}, the run read {want}; {fix}")
  return stage_dir, parts


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if "/" in k:
      raise ValueError(f"variable name {prefix + k!r} contains '/', the export's separator")
    out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
  return out


def _shapes(specs: list[dict[str, Any]]) -> dict[str, jax.ShapeDtypeStruct]:
  dims = dict(zip(("b", "t"), jax.export.symbolic_shape("b, t")))
  return {s["name"]: jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in s["shape"]), s["dtype"])
          for s in specs}


def _write(final: pathlib.Path, name: str, fn: Fn, variables, inputs, outputs, info, config,
           onnx: str) -> None:
  """Writes the export to a temporary sibling of `final` and renames it when complete: an
  interrupted export never leaves a directory that looks whole (nor replaces a good one)."""
  out = final.with_name(f".{final.name}.partial")
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  flat = _flatten(variables)
  exported.write_safetensors(out / exported.VARIABLES, flat)
  # The loader rebuilds the variables with unflatten: trace with exactly that tree.
  tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), exported.unflatten(flat))
  from avemo_jax.models import layers  # here: `load` (re-exported above) must not import Flax
  with layers.every_platform():
    function = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(tree, _shapes(inputs))
  (out / exported.FUNCTION).write_bytes(function.serialize())
  (out / exported.CONFIG).write_text(config.to_json(indent=2) + "\n")
  shutil.copyfile(exported.__file__, out / "load.py")
  manifest = {"format": 1, "name": name, **info, "inputs": inputs, "outputs": outputs,
              "function": {"file": exported.FUNCTION, "signature": "fn(variables, {input: array}) "
                           "-> {output: array}", "platforms": list(PLATFORMS),
                           "jax_version": jax.__version__,
                           "calling_convention": function.calling_convention_version},
              "variables": {"file": exported.VARIABLES, "count": len(flat),
                            "parameters": int(sum(a.size for a in flat.values()))},
              "onnx": export_onnx.convert(
                  out / "model.onnx", functools.partial(fn, variables), _shapes(inputs),
                  [o["name"] for o in outputs], random_inputs(inputs, batch=3, time=23, seed=1),
                  mode=onnx)}
  (out / exported.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  old = final.with_name(f".{final.name}.old")
  shutil.rmtree(old, ignore_errors=True)  # left by an export killed at the next line but one
  if final.exists():
    final.rename(old)
  out.rename(final)
  shutil.rmtree(old, ignore_errors=True)


def random_inputs(specs: list[dict[str, Any]], *, batch: int, time: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Random inputs for a manifest's input specs ("b" = batch, "t" = time): pixels 0-255,
  features N(0, 1), lengths in [1, time] with the first at `time`."""
  rng = np.random.default_rng(seed)
  out = {}
  for s in specs:
    shape = [{"b": batch, "t": time}.get(d, d) for d in s["shape"]]
    if s["name"] == "lengths":
      out[s["name"]] = np.r_[time, rng.integers(1, time + 1, batch - 1)].astype(np.int32)
    elif s["name"] == "images":
      out[s["name"]] = rng.integers(0, 256, shape).astype(np.float32)
    else:
      out[s["name"]] = rng.normal(size=shape).astype(np.float32)
  return out
