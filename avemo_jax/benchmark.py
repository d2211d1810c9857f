"""Speed of the full-size models, side by side with the same networks in PyTorch (issue 8).

Every row times what training runs: the models come from `train.build` with the configs' sizes,
the states from `state.create`, the steps are `train.steps` jitted once with the state donated,
the inputs the pipeline's `pipeline.train_iterator`. The PyTorch peer (`benchmark_torch`, when
torch is installed) runs in the same process on the same batch, alternating with JAX rep by rep
(JAX, torch, JAX, ...) so that both see the same machine load; torch gets as many threads as
there are cores, which is what XLA's CPU client uses. Each rep is one step (or one pipeline
window); the first `warmup` reps are not counted. JAX runs on one device.
"""
import csv
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from avemo_jax import hostmem
from avemo_jax.data import affectnet, fec, pipeline, synthetic
from avemo_jax.train import build, steps
from avemo_jax.train import state as state_lib

ROWS = ("face_train", "face_infer", "audio_train", "fusion_train", "fusion_infer",
        "first_step_cold_s", "first_step_warm_s", "pipeline_synthetic_per_core",
        "pipeline_arrayrecord_per_core", "predict_fps")
# Dense peak FLOP/s per chip (vendor data sheets) by device_kind substring: (float32 matmuls,
# which XLA runs as TF32 on these GPUs; bfloat16).
PEAK_FLOPS = {"h100": (494.7e12, 989.4e12), "h200": (494.7e12, 989.4e12),
              "a100": (156e12, 312e12), "l4": (60e12, 121e12), "tpu v4": (275e12, 275e12),
              "tpu v5 lite": (197e12, 197e12), "tpu v5p": (459e12, 459e12),
              "tpu v6": (918e12, 918e12)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to time and how often; batch sizes are per step (face: images of the step)."""
  reps: int = 5
  warmup: int = 3
  face_batch: int = 32
  audio_batch: int = 32
  fusion_batch: int = 8
  frames: int = 750  # fusion sequence length (30 s at 25 Hz)
  pipeline_batches: int = 8  # batches per pipeline rep
  peer: bool = True  # time the PyTorch peer too (it must be installed)
  predict_export: str = ""  # predict_fps: tools/export.py's --out of a trained workdir
  predict_video: str = ""  # predict_fps: a video with a face (and sound)


def cores() -> int:
  """CPU cores this process may use: what XLA's CPU client sizes its thread pool by."""
  return len(os.sched_getaffinity(0))


def machine() -> str:
  """The device, CPU model, cores and library versions the figures come from."""
  info = pathlib.Path("/proc/cpuinfo")
  lines = info.read_text().splitlines() if info.exists() else []
  cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "CPU")
  versions = [f"jax {jax.__version__}"]
  if importlib.util.find_spec("torch"):
    import torch  # pylint: disable=import-outside-toplevel
    versions.append(f"torch {torch.__version__}")
  return (f"{jax.devices()[0].device_kind} ({jax.default_backend()}); {cpu}, {cores()} cores "
          f"used; " + ", ".join(versions))


def _stats(values: list[float], unit: str) -> dict[str, Any]:
  q1, median, q3 = np.percentile(values, [25, 50, 75])
  return {"median": float(median), "min": float(min(values)), "max": float(max(values)),
          "iqr": float(q3 - q1), "reps": len(values), "unit": unit}


def _alternate(runs: dict[str, Callable[[], None]], items: int, unit: str, s: Settings
               ) -> dict[str, Any]:
  """{name: throughput stats} over alternating reps of each run (items per rep / seconds), with
  "ratio" = JAX median / torch median when both ran."""
  seconds = {name: [] for name in runs}
  for rep in range(s.warmup + s.reps):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      if rep >= s.warmup:
        seconds[name].append(time.perf_counter() - start)
  row = {name: _stats([items / t for t in ts], unit) for name, ts in seconds.items()}
  if "torch" in row:
    row["ratio"] = row["jax"]["median"] / row["torch"]["median"]
  return row


def _compiled(fn: Callable, *args, donate: bool) -> tuple[Callable, dict[str, float]]:
  """`fn` jitted and compiled ahead of time for `args`, with its compile time and XLA's count
  of floating-point operations per call."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*args).compile()
  info = {"compile_s": time.perf_counter() - start}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  if cost and cost.get("flops"):
    info["gflop_per_call"] = float(cost["flops"]) / 1e9
  return compiled, info


def _jax_train(model, stage, inputs, step: Callable, batch) -> tuple[Callable, dict]:
  """A run of one train step (state carried from rep to rep, donated) and its compile info."""
  state = state_lib.create(model, stage, jax.random.key(0), inputs)
  batch = jax.device_put(batch)
  compiled, info = _compiled(step, state, batch, donate=True)
  held = [state]

  def run():
    held[0], metrics = compiled(held[0], batch)
    jax.block_until_ready((held[0], metrics))
  return run, info


def _jax_infer(fn: Callable, variables, *args) -> tuple[Callable, dict]:
  args = jax.device_put(args)
  compiled, info = _compiled(fn, variables, *args, donate=False)
  return lambda: jax.block_until_ready(compiled(variables, *args)), info


def _utilisation(row: dict[str, Any], info: dict[str, float], items: int, dtype: str) -> None:
  """Adds the achieved GFLOP/s (XLA's FLOP count x steps/s) and, on GPU/TPU, model FLOPs
  utilisation: that over the chip's dense peak (PEAK_FLOPS)."""
  if "gflop_per_call" not in info:
    return
  row["jax"]["gflop_s"] = info["gflop_per_call"] * row["jax"]["median"] / items
  if jax.default_backend() == "cpu":
    return
  kind = jax.devices()[0].device_kind.lower()
  peak = next((p for k, p in PEAK_FLOPS.items() if k in kind), None)
  row["jax"]["mfu"] = (row["jax"]["gflop_s"] * 1e9 / peak[dtype == "bfloat16"] if peak else
                       f"not measured: no peak FLOP/s known for {kind!r} (PEAK_FLOPS)")


class Peer:
  """The torch side: its device, threads and (bf16) autocast; imports torch only when made."""

  def __init__(self, dtype: str):
    import torch  # pylint: disable=import-outside-toplevel
    from avemo_jax import benchmark_torch  # pylint: disable=import-outside-toplevel
    self.torch, self.lib = torch, benchmark_torch
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    self.device = "cuda" if gpu else "cpu"
    torch.set_num_threads(cores())
    torch.manual_seed(0)
    self.autocast = dict(device_type=self.device, dtype=torch.bfloat16,
                         enabled=dtype == "bfloat16")

  def check(self, model, jax_params: int, what: str) -> Any:
    """`model` on the device, after checking that it has our parameter count."""
    n = self.lib.num_params(model) - self.lib.redundant_gru_biases(model)
    if n != jax_params:
      raise AssertionError(f"{what}: the torch peer has {n:,} parameters, ours {jax_params:,}")
    return model.to(self.device)

  def run(self, fn: Callable, batch) -> Callable[[], None]:
    batch = self.lib.to_torch(batch, self.device, nchw=True)

    def run():
      with self.torch.autocast(**self.autocast):
        fn(batch)
      self.lib.synchronize(self.device)
    return run


def num_params(variables) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def face_batch(config: ml_collections.ConfigDict, images: int, seed: int = 0) -> dict[str, Any]:
  """A teacher-step batch of `images` faces: one FEC triplet per 8 images, labelled faces for the
  rest (the configs' default step is 16 faces + 4 triplets)."""
  rng, size = np.random.default_rng(seed), config.data.image_size
  nt = max(1, images // 8)
  pixels = lambda *shape: rng.integers(0, 256, (*shape, size, size, 3), dtype=np.uint8)
  labels = lambda n, k: rng.integers(0, k, n).astype(np.int32)
  return {"faces": {"image": pixels(images - 3 * nt), "label": labels(images - 3 * nt, 8)},
          "triplets": {"images": pixels(nt, 3), "label": labels(nt, 3),
                       "triplet_type": labels(nt, 3)}}


def face_rows(config, s: Settings, peer: Peer | None) -> dict[str, dict]:
  """face_train (teacher step) and face_infer (eval-mode logits and embeddings), images/s."""
  model = build.face_model(config.model, dtype=config.dtype)
  stage, inputs = config.teacher, build.face_inputs(config.data.image_size)
  batch = face_batch(config, s.face_batch)
  step = functools.partial(steps.teacher_step, weights=dict(stage.loss),
                           margins=tuple(stage.triplet_margins))
  train, train_info = _jax_train(model, stage, inputs, step, batch)
  variables = jax.jit(lambda r: model.init(r, *inputs, train=False))(jax.random.key(1))
  triplets = batch["triplets"]["images"]
  images = np.concatenate([batch["faces"]["image"], triplets.reshape(-1, *triplets.shape[2:])])
  infer, infer_info = _jax_infer(functools.partial(steps.predict, apply_fn=model.apply),
                                 variables, images)
  train_runs, infer_runs = {"jax": train}, {"jax": infer}
  if peer:
    net = peer.check(peer.lib.FaceNet(config.model), num_params(variables), "face network")
    train_runs["torch"] = peer.run(peer.lib.train_step(net, stage, peer.lib.face_loss(stage)),
                                   batch)
    infer_net = peer.check(peer.lib.FaceNet(config.model), num_params(variables), "face network")
    infer_runs["torch"] = peer.run(peer.lib.infer_step(infer_net), images)
  rows = {}
  for name, runs, info in (("face_train", train_runs, train_info),
                           ("face_infer", infer_runs, infer_info)):
    rows[name] = _alternate(runs, s.face_batch, "images/s", s)
    rows[name]["jax"].update(info)
    _utilisation(rows[name], info, s.face_batch, config.dtype)
  return rows


def audio_rows(config, s: Settings, peer: Peer | None) -> dict[str, dict]:
  """audio_train: the VGGish clip-regression step, log-mel examples/s."""
  model, stage = build.audio_model(config.audio, dtype=config.dtype), config.audio.train
  rng = np.random.default_rng(0)
  batch = {"mel": rng.normal(size=(s.audio_batch, 96, 64)).astype(np.float32),
           "labels": rng.uniform(-1, 1, (s.audio_batch, 2)).astype(np.float32)}
  step = functools.partial(steps.audio_step, weights=dict(stage.loss))
  train, info = _jax_train(model, stage, build.audio_inputs(), step, batch)
  runs = {"jax": train}
  if peer:
    params = num_params(jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                          *build.audio_inputs())))
    net = peer.check(peer.lib.VGGish(config.audio), params, "VGGish")
    runs["torch"] = peer.run(peer.lib.train_step(net, stage, peer.lib.audio_loss(stage)), batch)
  row = _alternate(runs, s.audio_batch, "examples/s", s)
  row["jax"].update(info)
  _utilisation(row, info, s.audio_batch, config.dtype)
  return {"audio_train": row}


def fusion_rows(config, s: Settings, peer: Peer | None) -> dict[str, dict]:
  """fusion_train and fusion_infer: the fused (visual + audio) GRU model over `frames`-long
  sequences, sequences/s."""
  modalities, f, stage = ("visual", "audio"), config.fusion, config.fusion.train
  dims = {"visual": config.model.feature_dim, "audio": config.audio.embed_dim}
  model = build.fusion_model(f, modalities)
  rng, b, t = np.random.default_rng(0), s.fusion_batch, s.frames
  batch = {m: rng.normal(size=(b, t, d)).astype(np.float32) for m, d in dims.items()}
  batch.update(labels=rng.uniform(-1, 1, (b, t, 2)).astype(np.float32),
               lengths=np.full(b, t, np.int32))
  # As in training, the step cuts its windows (here whole sequences) from the recordings.
  windows = {"recording": np.arange(b, dtype=np.int32), "start": np.zeros(b, np.int32)}
  step = lambda state, table_windows: steps.fusion_step(state, *table_windows, frames=t,
                                                        weights=dict(stage.loss), seed=0)
  train, train_info = _jax_train(model, stage, build.fusion_inputs(dims), step, (batch, windows))
  variables = model.init(jax.random.key(1), *build.fusion_inputs(dims))
  features = {m: batch[m] for m in modalities}
  infer, infer_info = _jax_infer(lambda v, x, n: model.apply(v, x, n)[0], variables, features,
                                 batch["lengths"])
  train_runs, infer_runs = {"jax": train}, {"jax": infer}
  if peer:
    make = lambda: peer.check(peer.lib.FusionGRU(f, modalities, dims), num_params(variables),
                              "fusion GRU")
    train_runs["torch"] = peer.run(peer.lib.train_step(make(), stage, peer.lib.fusion_loss(stage)),
                                   batch)
    infer_runs["torch"] = peer.run(peer.lib.infer_step(make()), features)
  rows = {}
  for name, runs, info in (("fusion_train", train_runs, train_info),
                           ("fusion_infer", infer_runs, infer_info)):
    rows[name] = _alternate(runs, b, "sequences/s", s)
    rows[name]["jax"].update(info)
    _utilisation(rows[name], info, b, "float32")
  return rows


def first_step(spec: dict[str, Any]) -> None:
  """In a fresh process (`first_step_seconds`): build the face network, initialise it, compile
  and run one teacher step, then print the wall-clock time."""
  hostmem.keep_freed_memory()  # as avemo_jax.main does
  config = ml_collections.ConfigDict(spec["config"])
  model = build.face_model(config.model, dtype=config.dtype)
  stage = config.teacher
  state = state_lib.create(model, stage, jax.random.key(0),
                           build.face_inputs(config.data.image_size))
  step = functools.partial(steps.teacher_step, weights=dict(stage.loss),
                           margins=tuple(stage.triplet_margins))
  state, metrics = jax.jit(step, donate_argnums=0)(state, face_batch(config, spec["images"]))
  jax.block_until_ready((state, metrics))
  print(time.time())


def first_step_seconds(config, images: int, cache_dir: str) -> float:
  """Wall-clock seconds from starting a Python process to its first finished face train step,
  with the persistent compilation cache in `cache_dir`."""
  spec = json.dumps({"config": config.to_dict(), "images": images})
  code = ("import json, sys; from avemo_jax import benchmark; "
          "benchmark.first_step(json.loads(sys.argv[1]))")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
  start = time.time()
  done = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True,
                        text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"the first-step process failed ({done.returncode}):\n{done.stderr[-3000:]}")
  return float(done.stdout.split()[-1]) - start


def first_step_rows(config, s: Settings) -> dict[str, float]:
  with tempfile.TemporaryDirectory() as cache:
    cold = first_step_seconds(config, s.face_batch, cache)
    warm = first_step_seconds(config, s.face_batch, cache)
  return {"first_step_cold_s": cold, "first_step_warm_s": warm}


def _pipeline_row(config, sources: pipeline.Sources, s: Settings) -> dict[str, Any]:
  """Images/s per core of the teacher stage's training iterator (rendering or decoding,
  augmentation, batching; in `data.workers` processes of `data.num_threads` threads), over
  `pipeline_batches` consecutive batches a rep."""
  iterator = pipeline.train_iterator(config, "teacher", sources, seed=0)
  images = config.teacher.batch_faces + 3 * config.teacher.batch_triplets
  used = min(max(config.data.workers, 1) * config.data.num_threads, cores())

  def run():
    for _ in range(s.pipeline_batches):
      next(iterator)
  row = _alternate({"jax": run}, images * s.pipeline_batches, "images/s/core", s)
  row["jax"] = {**{k: v / used if k in ("median", "min", "max", "iqr") else v
                   for k, v in row["jax"].items()}, "threads": used}
  return row


def synthetic_pipeline_row(config, s: Settings) -> dict[str, Any]:
  return _pipeline_row(config, pipeline.make_sources(config.data, seed=0), s)


def _write_manual(root: pathlib.Path, config, faces: int, triplets: int) -> None:
  """AffectNet and FEC in their release formats (CSV + JPEG photos), synthetic faces filling
  each photo, for the project's own prepare builders."""
  side = config.data.image_size + 20
  pool = synthetic.SyntheticFaces(faces, seed=0, size=side)
  photos = [f"{i % 7}/{i:05d}.jpg" for i in range(faces)]
  for i, photo in enumerate(photos):
    path = root / "affectnet" / "Manually_Annotated_Images" / photo
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pool[i]["image"]).save(path, quality=95)
  for name, rows in (("training.csv", range(faces)), ("validation.csv", range(8))):
    with open(root / "affectnet" / name, "w", newline="") as out:
      writer = csv.writer(out)
      writer.writerow(affectnet.HEADER)
      for i in rows:
        writer.writerow([photos[i], 0, 0, side, side, ";".join(["1.0"] * 136), i % 8, 0.1, 0.2])
  (root / "fec" / "images").mkdir(parents=True)
  for name, count in (("train", triplets), ("test", 8)):
    with open(root / "fec" / fec.CSVS[name], "w", newline="") as out:
      writer = csv.writer(out)
      for t in range(count):
        row = []
        for k in range(3):
          url = f"http://farm1.staticflickr.com/1/{name}{t}_{k}_b.jpg"
          Image.fromarray(pool[(3 * t + k) % faces]["image"]).save(
              root / "fec" / "images" / fec.image_name(url), quality=95)
          row += [url, 0.0, 1.0, 0.0, 1.0]
        votes = [v for rater in range(6) for v in (f"rater{rater}", 1)]  # face 1 is the odd one
        writer.writerow(row + [synthetic.TRIPLET_TYPES[t % 3]] + votes)


def arrayrecord_pipeline_row(config, s: Settings) -> dict[str, Any]:
  """The same iterator over AffectNet + FEC faces prepared (JPEG in ArrayRecord) by the project's
  builders into a temporary data_dir: read, decode, augment, batch."""
  with tempfile.TemporaryDirectory() as tmp:
    root, size, margin = pathlib.Path(tmp), config.data.image_size, config.data.crop_margin
    _write_manual(root, config, faces=64, triplets=32)
    affectnet.prepare(root / "affectnet", root / "data", image_size=size, margin=margin)
    fec.prepare(root / "fec", root / "data", image_size=size, margin=margin)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.update(source="tfds", data_dir=str(root / "data"), unlabelled="affectnet")
    return _pipeline_row(config, pipeline.make_sources(config.data, seed=0), s)


def predict_row(s: Settings) -> dict[str, Any]:
  """End-to-end `predict.predict_video` (decode, track and crop faces, log-mel, the exported
  face, audio and fusion models) on `s.predict_video` with `s.predict_export`: video frames/s."""
  if not (s.predict_export and s.predict_video):
    return {"not_measured": "needs an export of a trained workdir (tools/export.py) and a video: "
                            "--predict_export=DIR --predict_video=FILE"}
  from avemo_jax import predict  # pylint: disable=import-outside-toplevel
  frames, seconds = [], []

  def run():
    start = time.perf_counter()
    frames.append(len(predict.predict_video(s.predict_export, s.predict_video).times_s))
    seconds.append(time.perf_counter() - start)
  row = _alternate({"jax": run}, 1, "frames/s", s)
  # _alternate counted one item a rep: scale by the video's frame count. The first call also
  # loads and compiles the exports (once per process): its time is reported apart.
  row["jax"].update({k: row["jax"][k] * frames[0] for k in ("median", "min", "max", "iqr")},
                    frames=frames[0], first_call_s=seconds[0])
  return row


def run(config: ml_collections.ConfigDict, s: Settings, only: tuple[str, ...] = ROWS
        ) -> dict[str, Any]:
  """The selected ROWS, in ROWS order; the PyTorch peer where `s.peer`."""
  unknown = set(only) - set(ROWS)
  if unknown:
    raise ValueError(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
  peer = Peer(config.dtype) if s.peer else None
  groups = (({"face_train", "face_infer"}, lambda: face_rows(config, s, peer)),
            ({"audio_train"}, lambda: audio_rows(config, s, peer)),
            ({"fusion_train", "fusion_infer"}, lambda: fusion_rows(config, s, peer)),
            ({"first_step_cold_s", "first_step_warm_s"}, lambda: first_step_rows(config, s)),
            ({"pipeline_synthetic_per_core"},
             lambda: {"pipeline_synthetic_per_core": synthetic_pipeline_row(config, s)}),
            ({"pipeline_arrayrecord_per_core"},
             lambda: {"pipeline_arrayrecord_per_core": arrayrecord_pipeline_row(config, s)}),
            ({"predict_fps"}, lambda: {"predict_fps": predict_row(s)}))
  results = {}
  for names, measure in groups:
    if names & set(only):
      results.update({k: v for k, v in measure().items() if k in only})
  return {k: results[k] for k in ROWS if k in results}


def _cell(side: dict[str, Any] | None) -> str:
  if side is None:
    return ""
  return f"{side['median']:.3g} ({side['min']:.3g}-{side['max']:.3g}, n={side['reps']})"


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table: median (min-max, reps) per side, and the ratio."""
  lines = ["| row | JAX | PyTorch | JAX / PyTorch | unit |", "|---|---|---|---|---|"]
  for name, row in results.items():
    if not isinstance(row, dict):
      lines.append(f"| {name} | {row:.1f} | | | s |")
    elif "not_measured" in row:
      lines.append(f"| {name} | {row['not_measured']} | | | |")
    else:
      ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
      lines.append(f"| {name} | {_cell(row['jax'])} | {_cell(row.get('torch'))} | {ratio} | "
                   f"{row['jax']['unit']} |")
  return "\n".join(lines) + "\n"
