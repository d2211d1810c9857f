"""The one checkpoint path: Orbax CheckpointManager of {train state, data-iterator state}."""
import dataclasses
import datetime
import logging
import pathlib
import types
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from avemo_jax.train.state import TrainState


@dataclasses.dataclass(kw_only=True)
class _EverySeconds(ocp.checkpoint_managers.ContinuousCheckpointingPolicy):
  """Orbax's time-based policy (decided on the primary process, the answer broadcast to the
  others), with the first interval counted from `start` instead of saving at once."""
  start: datetime.datetime

  def should_save(self, step, previous_steps, *, context) -> bool:
    before = types.SimpleNamespace(step=-1, time=self.start, metrics=None)
    return super().should_save(step, list(previous_steps) or [before], context=context)


def quiet_orbax_logs() -> None:
  """Keeps Orbax's warnings and errors in the log but not its INFO lines (a dozen for every
  checkpoint written or read, most of them whole options objects)."""
  absl_logging.get_absl_logger().addFilter(_orbax_warnings_only)


def _orbax_warnings_only(record: logging.LogRecord) -> bool:
  # Python's levels: absl's own constants (absl_logging.WARNING == 1) are not `levelno`s.
  return "/orbax/" not in record.pathname or record.levelno >= logging.WARNING


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of a state's arrays, each replicated array written once, by the process
  holding its first replica. Orbax's default off GPUs ("replica-parallel") splits it among its
  replicas instead: an eager slice per array and device at every save, each slice shape a small
  program compiled at the first (the tests' `fusion.py:tiny` run, 4 steps a stage on 8 CPU devices,
  2 AMD Zen 3 cores: 98 -> 59-67 s). Our states are replicated data-parallel ones of < 1 GB. No
  array metadata store: it holds typed PRNG keys' metadata, and our states have none."""
  standard = ocp.type_handlers
  registry = standard.create_type_handler_registry(
      (jax.Array, standard.ArrayHandler(use_replica_parallel=False)),
      (np.ndarray, standard.NumpyHandler()),
      *((t, standard.ScalarHandler()) for t in (int, float, np.number)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _unused(path: pathlib.Path) -> pathlib.Path:
  """`path`, or `path`.<n> with the first n >= 2 that is not taken (a step unreadable again)."""
  n = 1
  while path.with_name(path.name + (f".{n}" if n > 1 else "")).exists():
    n += 1
  return path.with_name(path.name + (f".{n}" if n > 1 else ""))


class Checkpoints:
  """Saves and restores the train state together with the Grain iterator's position."""

  def __init__(self, directory: pathlib.Path, max_to_keep: int, every_secs: int = 0):
    """`every_secs` > 0: `due` says when that long has passed since the last save (or since
    now, before the first)."""
    self.every_secs = every_secs
    policy = (_EverySeconds(minimum_interval_secs=every_secs,
                            start=datetime.datetime.now(tz=datetime.timezone.utc))
              if every_secs > 0 else None)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           save_decision_policy=policy)
    self._state = _state_handler()
    self.manager = ocp.CheckpointManager(directory.absolute(), options=options,
                                         item_handlers={"state": self._state,
                                                        "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `every_secs` have passed since the last save and none is being written; every
    process gets the same answer (a barrier when there are several: call it on the same steps)."""
    return self.every_secs > 0 and self.manager.should_save(step)

  def save(self, step: int, state: TrainState, iterator: grain.DatasetIterator | None,
           train_seconds: float = 0.0) -> None:
    """`train_seconds`: the stage's training so far (all runs), kept in the step's metadata."""
    items = {"state": ocp.args.PyTreeSave(state)}
    if iterator is not None:
      items["data"] = ocp.args.JsonSave(iterator.get_state())
    self.manager.save(step, args=ocp.args.Composite(**items), force=True,  # the caller decided
                      custom_metadata={"train_seconds": round(train_seconds, 1)})

  def train_seconds(self, step: int) -> float:
    """The `train_seconds` saved with `step` (0 for checkpoints written before 2026-12-03)."""
    return float((self.manager.metadata(step).custom_metadata or {}).get("train_seconds", 0.0))

  def restore(self, state: Any, iterator: grain.DatasetIterator | None,
              step: int | None = None, *, partial: bool = False) -> Any:
    """Restores into `state`'s structure (and `iterator` in place); latest step by default.
    `partial`: `state` holds some of the saved state's top-level entries (say `params` and
    `batch_stats`), which alone are read."""
    step = self.latest_step() if step is None else step
    self._check_fits(state, step, partial)
    items = {"state": ocp.args.PyTreeRestore(
        state, restore_args=ocp.checkpoint_utils.construct_restore_args(state),
        partial_restore=partial)}
    if iterator is not None:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if iterator is not None:
      iterator.set_state(restored["data"])
    logging.info("restored step %d from %s", step, self.manager.directory)
    return restored["state"]

  def _check_fits(self, state: Any, step: int, partial: bool = False) -> None:
    """Raises ValueError naming the arrays that differ when `state` does not have the saved
    state's arrays (names and shapes; with `partial`, those under its top-level entries), before
    any is read: Orbax left the reads of a restore that failed on a shape pending, to end in
    errors whenever they were garbage-collected."""
    path = pathlib.Path(self.manager.directory) / str(step) / "state"
    saved = _shapes(self._state.metadata(path))
    ours = _shapes(state)
    if partial:
      saved = {k: v for k, v in saved.items() if k.split(".")[0] in state}
    if saved == ours:
      return
    missing, extra = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
    shapes = [f"{k} {saved[k]} saved, {ours[k]} here"
              for k in ours if saved.get(k, ours[k]) != ours[k]]
    problems = [f"{what} {items[:3]}" for what, items in (("saved, not here:", missing),
                                                           ("here, not saved:", extra),
                                                           ("other shapes:", shapes)) if items]
    hint = ""
    if all(k.startswith("opt_state.") for k in [*missing, *extra, *shapes]):
      hint = (" (only the optimizer state differs: another optimizer, or avemo_jax before "
              "2026-12-03, wrote it; its variables still serve as a teacher, student or audio "
              "checkpoint and for export; the code that wrote it resumes it)")
    raise ValueError(f"checkpoint {path} does not fit this state ({len(saved)} arrays saved, "
                     f"{len(ours)} here): " + "; ".join(problems) + hint)

  def restore_newest(self, state: TrainState, iterator: grain.DatasetIterator | None
                     ) -> tuple[TrainState, int]:
    """(restored state, step) of the newest checkpoint that reads back into `state` (a template
    of shapes will do; with no checkpoint at all this raises: ask `latest_step` first). Newer ones
    that do not read back (a file corrupted on disk; Orbax never lists one whose writing was
    interrupted) are renamed `<step>.unreadable` with a warning. When none reads back, the newest
    one's error is raised and nothing is renamed (e.g. another architecture)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        restored = self.restore(state, iterator, step)
      except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many kinds)
        errors.append((step, e))
        continue
      for bad, error in errors:
        path = pathlib.Path(self.manager.directory) / str(bad)
        aside = _unused(path.with_name(f"{bad}.unreadable"))
        logging.warning("checkpoint step %d in %s cannot be read (%s: %s); resuming from step %d "
                        "and keeping it as %s", bad, path.parent, type(error).__name__,
                        str(error)[:300], step, aside.name)
        if jax.process_index() == 0:
          path.rename(aside)
      if errors:
        if jax.process_count() > 1:  # every process sees the renames before it reloads
          ocp.multihost.sync_global_processes("avemo_jax_unreadable", timeout=600,
                                              processes=set(range(jax.process_count())))
        self.manager.reload()
      return restored, step
    if errors:
      raise ValueError(
          f"none of the checkpoints {steps} in {self.manager.directory} reads back into this "
          "stage's model and optimizer (written with another architecture or config? use another "
          f"--workdir, or delete them to start over); newest: {errors[0][1]}") from errors[0][1]
    raise FileNotFoundError(f"no checkpoint in {self.manager.directory} to restore")

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{dotted path: shape} of a state's arrays, or of Orbax's metadata of a saved one."""
  return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_variables(path: str, template: TrainState, what: str) -> dict[str, Any]:
  """Model variables of the newest checkpoint in a stage directory (or its checkpoints/ folder).

  `template` is a (possibly abstract, `jax.eval_shape`) state of the same model; `what` names
  the config key in errors. Only the variables are read, whatever optimizer state was saved
  beside them. They land on this process's first device, whatever the devices and processes the
  checkpoint was written from.
  """
  directory = pathlib.Path(path)
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{what}={path!r}: no such directory; give a stage directory "
                            "(e.g. WORKDIR/student) or its checkpoints/ folder")
  checkpoints = Checkpoints(directory, max_to_keep=1)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"{what}={path!r}: no Orbax checkpoint in {directory}; give a stage "
                            "directory (e.g. WORKDIR/student) or its checkpoints/ folder")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                           template.variables)
  try:
    return checkpoints.restore(variables, None, partial=True)
  except ValueError as e:  # Orbax: tree structures or array shapes differ
    raise ValueError(f"{what}={path!r} does not fit this stage's model (written "
                     "with another architecture, e.g. another config.model width or cut?); give "
                     f"a checkpoint of this architecture or change config.model. Orbax: {e}"
                     ) from e
  finally:
    checkpoints.manager.close()
