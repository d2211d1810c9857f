"""Compiling for accelerators this machine does not have (XLA's deviceless compilation, as for
ahead-of-time builds): test_gpu_compile.py and test_tpu_compile.py."""
import contextlib
import functools

import jax
import numpy as np

from avemo_jax import parallel
from avemo_jax.benchmark_common import face_batch
from avemo_jax.models import layers
from avemo_jax.train import build, steps
from avemo_jax.train import state as state_lib
from configs import fusion

STAGES = ("teacher", "student", "audio", "fusion")


@contextlib.contextmanager
def uncached():
  """Nothing compiled here goes into the persistent compilation cache: a deviceless executable
  does not load back from it (JAX decides once per process whether to use the cache at all)."""
  least = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", least)


def _stage(config, name: str):
  """(model, its stage config, its example inputs, step, extra step arguments, a global batch)
  of one stage, as `train.stages` trains it."""
  rng = np.random.default_rng(0)
  if name in ("teacher", "student"):
    cfg, model = config[name], build.face_model(config.model, dtype=config.dtype)
    inputs, batch = build.face_inputs(config.data.image_size), face_batch(config, 64)
    kw = dict(weights=dict(cfg.loss), margins=tuple(cfg.triplet_margins))
    if name == "teacher":
      return model, cfg, inputs, functools.partial(steps.teacher_step, **kw), (), batch
    teacher = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
    return (model, cfg, inputs,
            functools.partial(steps.distill_step, temperature=cfg.temperature, **kw),
            (teacher,), batch)
  if name == "audio":
    batch = {"mel": rng.normal(size=(16, 96, 64)).astype(np.float32),
             "labels": rng.uniform(-1, 1, (16, 2)).astype(np.float32)}
    return (build.audio_model(config.audio, dtype=config.dtype), config.audio.train,
            build.audio_inputs(),
            functools.partial(steps.audio_step, weights=dict(config.audio.train.loss)), (), batch)
  dims = {"visual": config.model.feature_dim, "audio": config.audio.embed_dim}
  frames, f = config.fusion.chunk_frames, config.fusion
  table = {**{m: np.zeros((4, 2 * frames, d), np.float32) for m, d in dims.items()},
           "labels": np.zeros((4, 2 * frames, 2), np.float32),
           "lengths": np.full(4, 2 * frames, np.int32)}
  windows = {"recording": np.arange(16, dtype=np.int32) % 4, "start": np.zeros(16, np.int32)}
  return (build.fusion_model(f, tuple(dims)), f.train, build.fusion_inputs(dims),
          functools.partial(steps.fusion_step, frames=frames, weights=dict(f.train.loss), seed=0),
          (table,), windows)


def train_step(devices: list, name: str, gru_kernel: str = "scan") -> str:
  """Stage `name`'s train step (`configs/fusion.py:tiny`, bf16) compiled for `devices` as
  `parallel.DataParallel` compiles it (state replicated, batch split over the devices), in the
  forms of those devices' platform -> the compiled program's text."""
  config = fusion.get_config("tiny")
  config.dtype = "bfloat16"  # "auto" on GPUs and TPUs
  config.fusion.gru_kernel = gru_kernel
  model, cfg, inputs, step, args, batch = _stage(config, name)
  template = jax.eval_shape(lambda: state_lib.create(model, cfg, jax.random.key(0), inputs))
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)
  par = parallel.DataParallel("jit", devices=devices)
  with layers.every_platform(), uncached():  # this process's backend is the CPU
    lowered = par.compile(step, len(args)).lower(template, *abstract(args), abstract(batch))
    return lowered.compile().as_text()
