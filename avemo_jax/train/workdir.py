"""Workdir safety: one run at a time per workdir, a finished run is not run again, and the
config.json a run writes names its inputs from any directory."""
import contextlib
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import ml_collections

from avemo_jax import parallel

_LOCK, _DONE = ".lock", "finished.json"
# The config's paths of inputs (when the config has the key).
PATHS = ("data.data_dir", "teacher_checkpoint", "student_checkpoint", "audio_checkpoint",
         "init.face_backbone", "init.audio")


def absolute_paths(config: ml_collections.ConfigDict) -> None:
  """Makes the relative `PATHS` of `config` absolute (URLs such as gs://... stay): config.json
  then names the same inputs wherever a later tool runs (tools/export.py reads the checkpoints a
  fusion-only run reused from it)."""
  for key in PATHS:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node.get(name)
    if node is not None and node.get(leaf) and "://" not in node[leaf]:
      node[leaf] = os.path.abspath(node[leaf])


@contextlib.contextmanager
def exclusive(workdir: pathlib.Path) -> Iterator[None]:
  """Holds WORKDIR/.lock (process 0 of a run) so that a second run on the same workdir fails at
  once instead of interleaving checkpoints and metrics. The OS drops the lock when the process
  ends, however it ends (kill -9 included), so a stale lock cannot block a restart."""
  if not parallel.is_main_process():
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / _LOCK, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise BlockingIOError(f"{workdir} is in use by another run ({holder}); wait for it to "
                            "finish, or choose another --workdir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _key(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What makes two runs the same run (where and how it runs, `parallel`, does not)."""
  key = json.loads(config.to_json_best_effort())
  key.pop("parallel", None)
  return key


def finished(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any] | None:
  """The summary of a run of exactly this config that finished in workdir, else None."""
  path = workdir / _DONE
  if not path.exists():
    return None
  done = json.loads(path.read_text())
  return done["summary"] if done.get("config") == _key(config) else None


def mark_finished(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  summary: dict[str, Any]) -> None:
  if parallel.is_main_process():
    tmp = workdir / (_DONE + ".tmp")
    tmp.write_text(json.dumps({"config": _key(config), "summary": summary}, indent=1))
    tmp.replace(workdir / _DONE)


def clear_finished(workdir: pathlib.Path) -> None:
  """A run that starts in workdir: an earlier run's mark no longer holds (its stages may be set
  aside, `provenance`)."""
  if parallel.is_main_process():
    (workdir / _DONE).unlink(missing_ok=True)
