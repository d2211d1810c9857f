"""What every benchmark row shares: its settings, the machine it ran on, throughput over
alternating timed reps, and the face step's batch."""
import dataclasses
import importlib.util
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from avemo_jax import xla_cpu


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
  # A jax.profiler trace of 2 more JAX reps of each model row, after its timed ones, into
  # PROFILE/<row> (TensorBoard's profile plugin reads the .xplane.pb, Perfetto the .trace.json.gz).
  profile: str = ""


def cores() -> int:
  """CPU cores this process may use: what XLA's CPU client sizes its thread pool by."""
  return len(os.sched_getaffinity(0))


def machine() -> str:
  """The device, CPU model, cores and library versions the figures come from."""
  cpu = xla_cpu.cpuinfo().get("model name", "CPU")
  versions = [f"jax {jax.__version__}"]
  if importlib.util.find_spec("torch"):
    import torch  # pylint: disable=import-outside-toplevel
    versions.append(f"torch {torch.__version__}")
  library = {"eigen": "Eigen", "ynnpack": "YNNPACK"}[xla_cpu.convolutions()]
  convs = f" (XLA's convolutions: {library})" if jax.default_backend() == "cpu" else ""
  return (f"{jax.devices()[0].device_kind} ({jax.default_backend()}); {cpu}, {cores()} cores "
          f"used{convs}; " + ", ".join(versions))


def _stats(values: list[float], unit: str) -> dict[str, Any]:
  q1, median, q3 = np.percentile(values, [25, 50, 75])
  return {"median": float(median), "min": float(min(values)), "max": float(max(values)),
          "iqr": float(q3 - q1), "reps": len(values), "unit": unit}


def alternate(runs: dict[str, Callable[[], None]], items: int, unit: str, s: Settings,
              trace_as: str = "") -> dict[str, Any]:
  """{name: throughput stats} over alternating reps of each run (items per rep / seconds), with
  "ratio" = JAX median / torch median when both ran; with `s.profile`, a trace of the JAX run
  named `trace_as` (the row)."""
  seconds = {name: [] for name in runs}
  for rep in range(s.warmup + s.reps):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      if rep >= s.warmup:
        seconds[name].append(time.perf_counter() - start)
  if s.profile and trace_as:
    with jax.profiler.trace(pathlib.Path(s.profile) / trace_as, create_perfetto_trace=True):
      for _ in range(2):
        runs["jax"]()
  row = {name: _stats([items / t for t in ts], unit) for name, ts in seconds.items()}
  if "torch" in row:
    row["ratio"] = row["jax"]["median"] / row["torch"]["median"]
  return row


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
