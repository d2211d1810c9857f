"""The one training loop, shared by every stage: step, log, evaluate, checkpoint, resume."""
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from avemo_jax import parallel as parallel_lib
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import Checkpoints
from avemo_jax.train.writer import MetricWriter


@dataclasses.dataclass
class Stage:
  """What the loop needs to train one stage.

  `step(state, *step_args, batch, axis_name=None) -> (state, metrics)` is a pure function
  (static arguments already bound); the loop compiles it once for the data-parallel backend,
  with the state donated. `batches` yields this process's share of each global batch.
  `evaluate(state) -> dict` gets a single-device copy of the state and returns scalar metrics
  (plus anything non-scalar, which is not logged).
  """
  name: str
  config: ml_collections.ConfigDict
  step: Callable
  step_args: tuple[Any, ...]
  batches: grain.DatasetIterator
  evaluate: Callable[[state_lib.TrainState], dict[str, Any]]


def _scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  return {prefix + k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def train(stage: Stage, state: state_lib.TrainState, workdir: pathlib.Path,
          max_checkpoints: int, parallel: parallel_lib.DataParallel
          ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Trains `stage` to `config.num_steps` from the newest checkpoint in workdir (if any), on
  all devices; a checkpoint written on any number of devices restores onto these."""
  cfg = stage.config
  checkpoints = Checkpoints(workdir / "checkpoints", max_checkpoints)
  start = checkpoints.latest_step() or 0
  state = parallel.put(state)
  if start:
    state = checkpoints.restore(state, stage.batches, start)
  main = parallel_lib.is_main_process()
  writer = MetricWriter(workdir, resume_step=start) if main else None
  step_args = parallel.put(stage.step_args)
  step_fn, compiled = parallel.compile(stage.step, len(step_args)), None
  schedule = state_lib.schedule(cfg)
  pending, data_wait, window_start = [], 0.0, time.perf_counter()
  for step in range(start + 1, cfg.num_steps + 1):
    t0 = time.perf_counter()
    batch = parallel.batch(next(stage.batches))
    data_wait += time.perf_counter() - t0
    if compiled is None:  # once, on the first batch: ahead of time, every process in step
      compiled = parallel.ready(step_fn, state, *step_args, batch)
    state, metrics = compiled(state, *step_args, batch)
    pending.append(metrics)
    last = step == cfg.num_steps
    if step % cfg.log_every == 0 or last:
      host = jax.device_get(pending)  # blocks: the only host sync of the window
      elapsed = time.perf_counter() - window_start
      logged = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      logged.update(learning_rate=float(schedule(step - 1)),
                    steps_per_sec=len(host) / elapsed, data_wait_frac=data_wait / elapsed)
      if writer:
        writer.write(step, logged)
      eta = (cfg.num_steps - step) * elapsed / len(host)
      logging.info("[%s] step %d/%d loss %.4f  %.2f steps/s  data wait %.0f%%  ETA %.0fs",
                   stage.name, step, cfg.num_steps, logged["loss"], logged["steps_per_sec"],
                   100 * logged["data_wait_frac"], eta)
      pending, data_wait, window_start = [], 0.0, time.perf_counter()
    if cfg.eval_every and step % cfg.eval_every == 0 and not last:
      result = _scalars(stage.evaluate(parallel_lib.local(state)), "eval_")
      if writer:
        writer.write(step, result)
      window_start = time.perf_counter()  # evaluation time is not training throughput
    if step % cfg.checkpoint_every == 0 or last:
      checkpoints.save(step, state, stage.batches)
  checkpoints.close()
  final = stage.evaluate(parallel_lib.local(state))
  if writer:
    writer.write(cfg.num_steps, _scalars(final, "eval_"))
    writer.close()
  return state, final
