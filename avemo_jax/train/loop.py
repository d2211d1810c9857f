"""The one training loop, shared by every stage: step, log, evaluate, checkpoint, resume.

Preemption: SIGTERM (one process) or JAX's preemption notice (several processes, through Orbax)
saves a checkpoint at the next step boundary and exits with status 143; the same command resumes.
Non-finite steps change nothing (steps.py); the stage's `on_nonfinite` stops the run at the next
host sync naming the step, the terms and the last good checkpoint, or counts and skips them.
"""
import contextlib
import dataclasses
import itertools
import logging
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax

from avemo_jax import hostmem
from avemo_jax import parallel as parallel_lib
from avemo_jax.train import provenance
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import Checkpoints
from avemo_jax.train.writer import MetricWriter


@dataclasses.dataclass
class Stage:
  """What the loop needs to train one stage.

  `step(state, *step_args, batch, axis_name=None) -> (state, metrics)` is a pure function
  (static arguments already bound); the loop compiles it once for the data-parallel backend,
  with the state donated. `init()` makes the state to start from: traced for its shapes (which
  the step is compiled for), then called in a thread while the step compiles and the first
  batches are read (when resuming, only traced: the checkpoint has the values).
  `batches` yields this process's share of each global batch. `evaluate(state) -> dict` gets a
  single-device copy of the state and returns scalar metrics (plus anything non-scalar, which is
  not logged). `trained_from` (`provenance.settings`): checkpoints trained from anything else
  are set aside, not resumed.
  """
  name: str
  config: ml_collections.ConfigDict
  step: Callable
  step_args: tuple[Any, ...]
  init: Callable[[], state_lib.TrainState]
  batches: grain.DatasetIterator
  evaluate: Callable[[state_lib.TrainState], dict[str, Any]]
  trained_from: dict[str, Any] | None = None


PREFETCH = 2  # batches read (on accelerators: put on the devices) ahead of the step
# The parameters' L2 norm, logged with each window: its own program, run at log time. In every
# step it was a reduction per parameter array (331 in the face step: on the CPU 114 more YNNPACK
# fusions, which XLA loads one by one, and a warm first step 2-3 s slower on 2 Zen 3 cores).
param_norm = jax.jit(optax.tree.norm)


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written: exit status 143 (128 + SIGTERM)."""

  def __init__(self, stage: str, step: int):
    super().__init__(143)
    self.stage, self.step = stage, step


class NonFiniteError(FloatingPointError):
  """A step's loss or gradient norm was not finite (on_nonfinite="stop")."""


class _Profile:
  """A `jax.profiler` trace of `count` steps from the `first`-th this process runs, into `logdir`
  (by hand, not clu's `periodic_actions.Profile`: that one stops without waiting for the steps
  the devices still run)."""

  def __init__(self, logdir: pathlib.Path, first: int, count: int):
    if jax.process_count() > 1:
      logdir = logdir / f"process_{jax.process_index()}"
    self.logdir, self.first, self.count, self.runs = logdir, first, count, 0
    self.started = self.last = None  # steps traced, while tracing

  def before(self, step: int) -> None:
    self.runs += 1
    if self.runs == self.first and self.count > 0:
      jax.profiler.start_trace(str(self.logdir))
      self.started = step

  def after(self, step: int, outputs: Any) -> None:
    self.last = step
    if self.started is not None and self.runs == self.first + self.count - 1:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.started is not None:
      jax.profiler.stop_trace()
      logging.info("profile of steps %d-%d written to %s", self.started, self.last, self.logdir)
      self.started = None


def _scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  return {prefix + k: float(v) for k, v in metrics.items()
          if v is not None and not isinstance(v, dict) and np.ndim(v) == 0}


@contextlib.contextmanager
def _sigterm_flag():
  """A flag that SIGTERM sets (instead of killing the process) while the loop runs."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag  # signal handlers can only be set from the main thread
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


class _Placed:
  """`batches`, each put on the devices by `put`, for Grain's thread prefetch (which keeps the
  state after each batch it hands out: checkpoints store the loop's position, not the thread's)."""

  def __init__(self, batches: grain.DatasetIterator, put: Callable[[Any], Any]):
    self.batches, self.put = batches, put

  def __next__(self) -> Any:
    return self.put(next(self.batches))

  def get_state(self) -> dict[str, Any]:
    return self.batches.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.batches.set_state(state)


def _check_finite(stage: Stage, steps: list[int], host: list[dict[str, Any]],
                  checkpoints: Checkpoints) -> int:
  """Number of non-finite steps among `steps`; with on_nonfinite="stop", raises on the first."""
  bad = [(s, m) for s, m in zip(steps, host) if m["nonfinite"]]
  policy = stage.config.on_nonfinite
  if policy not in ("stop", "skip"):
    raise ValueError(f"[{stage.name}] on_nonfinite={policy!r}: choose 'stop' or 'skip'")
  if bad and policy == "stop":
    step, metrics = bad[0]
    terms = [k for k, v in metrics.items() if k != "nonfinite" and not np.all(np.isfinite(v))]
    checkpoints.close()  # let the last good checkpoint finish writing
    good = checkpoints.latest_step()
    where = (f"step {good} in {checkpoints.manager.directory}" if good is not None
             else f"none yet in {checkpoints.manager.directory}")
    raise NonFiniteError(
        f"[{stage.name}] step {step}: non-finite {', '.join(terms) or 'update'} (the step changed "
        f"nothing). Last good checkpoint: {where}. Lower the learning rate or check the data, or set this "
        "stage's on_nonfinite='skip' to skip such steps.")
  for step, _ in bad:
    logging.warning("[%s] step %d: non-finite loss, gradient or update: skipped", stage.name, step)
  return len(bad)


def _start_up(stage: Stage, parallel: parallel_lib.DataParallel, checkpoints: Checkpoints,
              batches: grain.DatasetIterator) -> tuple[state_lib.TrainState, int, tuple[Any, ...],
                                                        Callable | None, Iterator[Any]]:
  """(state, its step, the step's extra arguments on the devices, the step compiled ahead of time
  on the first batch, the batches from that one on). A fresh state is made while the step
  compiles; a resumed one is restored from the newest checkpoint that reads back first."""
  began = time.perf_counter()
  fresh = checkpoints.latest_step() is None
  template = parallel.template(stage.init)  # the step is compiled for it, or restored into
  if fresh:
    state, start = None, 0
  else:  # only the state's shapes are made; its data position restarts the reading
    state, start = checkpoints.restore_newest(template, batches)
    state = state_lib.with_hyperparameters(
        state, parallel.put(state_lib.hyperparameters(stage.config)))
  step_args = parallel.put(stage.step_args)
  if start >= stage.config.num_steps:  # nothing to train: evaluated as it is
    state = parallel.put(stage.init()) if fresh else state
    return state, start, step_args, None, batches
  first = next(batches)
  read_s = time.perf_counter() - began
  step = parallel.compile(stage.step, len(step_args))  # every process in step: see ready()
  if fresh:
    state, compiled = parallel.start(step, stage.init, template, *step_args, first)
  else:
    compiled = parallel.ready(step, state, *step_args, first)
  logging.info("[%s] start-up: %.1fs (state template%s and first batch in %.1fs)", stage.name,
               time.perf_counter() - began, "" if fresh else ", restore", read_s)
  return state, start, step_args, compiled, itertools.chain([first], batches)


def train(stage: Stage, workdir: pathlib.Path, max_checkpoints: int,
          parallel: parallel_lib.DataParallel) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Trains `stage` to `config.num_steps` from the newest checkpoint in workdir (if any), on
  all devices; a checkpoint written on any number of devices restores onto these. Returns the
  state and the final evaluation, with "train_seconds": the wall time of the stage up to its
  last step (start-up, steps, evaluations, checkpoints) summed over the runs that trained it."""
  began = time.perf_counter()
  cfg = stage.config
  if stage.trained_from is not None:
    provenance.claim(workdir, stage.trained_from)
  checkpoints = Checkpoints(workdir / "checkpoints", max_checkpoints,
                            every_secs=cfg.checkpoint_every_secs)
  # The next batches are read and placed (`DataParallel.batch`) by a thread while the step runs,
  # and the first ones (Grain's worker processes starting: 2-3 s) while the state is traced.
  batches = grain.experimental.ThreadPrefetchDatasetIterator(
      _Placed(stage.batches, parallel.batch), prefetch_buffer_size=PREFETCH)
  batches.start_prefetch()
  # Grain's worker processes and threads end with the stage, however it ends.
  closing = contextlib.closing if hasattr(stage.batches, "close") else contextlib.nullcontext
  profile = _Profile(workdir / "profile", cfg.profile_first, cfg.profile_steps)
  with (closing(stage.batches), contextlib.closing(batches), contextlib.closing(profile),
        _sigterm_flag() as sigterm):
    state, start, step_args, compiled, upcoming = _start_up(stage, parallel, checkpoints, batches)
    before = checkpoints.train_seconds(start) if start else 0.0  # the runs before this one
    train_seconds = before  # to the newest checkpoint (the last step always writes one)
    if cfg.profile_steps and cfg.profile_first > cfg.num_steps - start:
      logging.warning("[%s] no profile: it would start at the %d-th step this process runs "
                      "(profile_first), and it runs %d", stage.name, cfg.profile_first,
                      cfg.num_steps - start)
    main = parallel_lib.is_main_process()
    writer = MetricWriter(workdir, resume_step=start) if main else None
    schedule = state_lib.schedule(cfg)
    skipped = 0  # non-finite steps skipped since this process started the stage
    pending, checked, data_wait, window_start = [], 0, 0.0, time.perf_counter()
    timed = 0  # steps since window_start (an evaluation restarts the clock, not the window)
    for step in range(start + 1, cfg.num_steps + 1):
      t0 = time.perf_counter()
      batch = next(upcoming)
      waited = time.perf_counter() - t0
      # On an accelerator the main thread usually runs steps ahead of the devices: waiting for a
      # batch counts only if they had finished the last step dispatched (an upper bound on their
      # idle time). On the CPU each step returns finished (`hostmem`): every wait counts.
      if not pending or jax.tree.leaves(pending[-1][1])[0].is_ready():
        data_wait += waited
      profile.before(step)
      state, metrics = compiled(state, *step_args, batch)
      profile.after(step, (state, metrics))
      pending.append((step, metrics))
      timed += 1
      last = step == cfg.num_steps
      save = (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
              or (step % cfg.log_every == 0 and checkpoints.due(step)))
      preempted = sigterm.is_set() or (jax.process_count() > 1
                                       and checkpoints.manager.reached_preemption(step))
      if step % cfg.log_every == 0 or last or save or preempted:
        steps, host = zip(*jax.device_get(pending))  # blocks: the host sync of the window
        skipped += _check_finite(stage, steps[checked:], host[checked:], checkpoints)
        checked = len(pending)
      if step % cfg.log_every == 0 or last:
        elapsed = time.perf_counter() - window_start
        good = [m for m in host if not m["nonfinite"]] or host
        logged = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != "nonfinite"}
        logged.update(param_norm=float(param_norm(state.params)),
                      learning_rate=float(schedule(step - 1)), skipped_steps=skipped,
                      steps_per_sec=timed / elapsed, data_wait_frac=data_wait / elapsed)
        if writer:
          writer.write(step, logged)
        eta = (cfg.num_steps - step) * elapsed / timed
        logging.info("[%s] step %d/%d loss %.4f  %.2f steps/s  data wait %.0f%%  ETA %.0fs",
                     stage.name, step, cfg.num_steps, logged["loss"], logged["steps_per_sec"],
                     100 * logged["data_wait_frac"], eta)
        pending, checked, data_wait, window_start = [], 0, 0.0, time.perf_counter()
        timed = 0
      if cfg.eval_every and step % cfg.eval_every == 0 and not last:
        with hostmem.gc_paused():  # its first call traces the evaluation
          result = _scalars(stage.evaluate(parallel_lib.local(state)), "eval_")
        if writer:
          writer.write(step, result)
        # Evaluating is not training: the window's rates count the steps after it.
        window_start, timed, data_wait = time.perf_counter(), 0, 0.0
      if save or preempted:
        train_seconds = before + time.perf_counter() - began
        checkpoints.save(step, state, batches, train_seconds)
      if preempted and not last:
        _preempted(stage, step, workdir, checkpoints, writer)
    if sigterm.is_set():  # in the last step, or while a finished stage was restored
      _preempted(stage, cfg.num_steps, workdir, checkpoints, writer)
  checkpoints.close()
  with hostmem.gc_paused():
    final = stage.evaluate(parallel_lib.local(state))
  if writer:
    if not (start >= cfg.num_steps and writer.logged(cfg.num_steps, "eval_")):  # not again
      writer.write(cfg.num_steps, _scalars(final, "eval_"))
    writer.close()
  return state, {**final, "train_seconds": round(train_seconds, 1)}


def _preempted(stage: Stage, step: int, workdir: pathlib.Path, checkpoints: Checkpoints,
               writer: MetricWriter | None) -> None:
  """Raises Preempted once step `step`'s checkpoint is written."""
  checkpoints.close()
  if writer:
    writer.close()
  logging.warning("[%s] preempted: checkpoint of step %d written to %s; run the same command "
                  "again to resume", stage.name, step, workdir)
  raise Preempted(stage.name, step)
