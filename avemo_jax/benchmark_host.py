"""Benchmark rows of the host side, JAX alone: time from a fresh process to the first face train
step (with an empty and a filled compilation cache), the face input pipelines in images/s per
core (synthetic, and faces prepared into ArrayRecord by the project's builders), and
`predict.predict_video` end to end in video frames/s."""
import contextlib
import csv
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import tensorflow_datasets as tfds
from PIL import Image

from avemo_jax import parallel, xla_cpu
from avemo_jax.benchmark_common import Settings, alternate, cores, face_batch
from avemo_jax.data import affectnet, fec, pipeline, synthetic
from avemo_jax.train import build, steps
from avemo_jax.train import state as state_lib


def first_step(spec: dict[str, Any]) -> None:
  """In a fresh process (`first_step_seconds`): build the face network, initialise it, compile
  and run one teacher step as the training loop does, then print the wall-clock time. On one
  device, as the model rows (the batch need not split over 8 GPUs or fake CPU devices)."""
  xla_cpu.prepare()  # as avemo_jax.main does
  config = ml_collections.ConfigDict(spec["config"])
  model = build.face_model(config.model, dtype=config.dtype)
  stage = config.teacher
  par = parallel.DataParallel(config.parallel.backend, devices=jax.devices()[:1])
  init = lambda: state_lib.create(model, stage, jax.random.key(0),
                                  build.face_inputs(config.data.image_size))
  template = par.template(init)
  step = par.compile(functools.partial(steps.teacher_step, weights=dict(stage.loss),
                                       margins=tuple(stage.triplet_margins)), 0)
  batch = par.batch(face_batch(config, spec["images"]))
  state, compiled = par.start(step, init, template, batch)
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  print(time.time())


def first_step_seconds(config, images: int, cache_dir: str) -> float:
  """Wall-clock seconds from starting a Python process to its first finished face train step,
  with the persistent compilation cache in `cache_dir`."""
  spec = json.dumps({"config": config.to_dict(), "images": images})
  code = ("import json, sys; from avemo_jax import benchmark_host; "
          "benchmark_host.first_step(json.loads(sys.argv[1]))")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
  start = time.time()
  done = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True,
                        text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"the first-step process failed ({done.returncode}):\n{done.stderr[-3000:]}")
  return float(done.stdout.split()[-1]) - start


def first_step_rows(config, s: Settings, want: set[str]) -> dict[str, float]:
  """first_step_cold_s and first_step_warm_s, those in `want`; the warm process loads what a
  cold one compiled into the cache, so the cold process runs either way."""
  with tempfile.TemporaryDirectory() as cache:
    rows = {"first_step_cold_s": first_step_seconds(config, s.face_batch, cache)}
    if "first_step_warm_s" in want:
      rows["first_step_warm_s"] = first_step_seconds(config, s.face_batch, cache)
  return {k: v for k, v in rows.items() if k in want}


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
  row = alternate({"jax": run}, images * s.pipeline_batches, "images/s/core", s)
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
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    root, size, margin = pathlib.Path(tmp), config.data.image_size, config.data.crop_margin
    _write_manual(root, config, faces=64, triplets=32)
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints its progress: stdout is the table's
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
  row = alternate({"jax": run}, 1, "frames/s", s)
  # alternate counted one item a rep: scale by the video's frame count. The first call also
  # loads and compiles the exports (once per process): its time is reported apart.
  row["jax"].update({k: row["jax"][k] * frames[0] for k in ("median", "min", "max", "iqr")},
                    frames=frames[0], first_call_s=seconds[0])
  return row
