"""What a stage's checkpoints were trained from: WORKDIR/<stage>/trained_from.json.

A stage resumes its checkpoints only when it would train from the same things: the config that
shapes what it learns (its section, the model, the data, the seed) and what earlier stages hand
it (the teacher's weights, the extracted features). Otherwise those checkpoints belong to another
run (a longer teacher, other loss weights): they are moved to WORKDIR/<stage>/stale/<n>/, with a
warning naming what changed, and the stage trains again, or takes back a training set aside
earlier from exactly these settings and inputs (a run with other loss weights, then the first
ones again). Nothing trained is deleted. Bookkeeping, the schedule's length and the optimizer
settings (which a resumed stage takes from its config) may change between runs.
"""
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from avemo_jax import parallel

FILE, STALE = "trained_from.json", "stale"
_claims = 0  # barriers so far (each needs its own name)
# May differ between runs of one stage: neither what it learns from nor how.
_FREE = {"num_steps", "log_every", "eval_every", "checkpoint_every", "checkpoint_every_secs",
         "on_nonfinite", "profile_steps", "profile_first", "learning_rate", "warmup_steps",
         "weight_decay", "grad_clip",  # data: how it is read; fusion: which models, how run
         "eval_batch", "num_threads", "prefetch", "workers", "models", "gru_kernel", "unroll"}
_OUTPUTS = ("checkpoints", "metrics.jsonl", "confusion.png", "profile", "config.json")


def settings(config: ml_collections.ConfigDict, *keys: str, **inputs: Any) -> dict[str, Any]:
  """The config entries `keys` ("teacher", "init.audio", ...) without the keys free to change,
  and `inputs` (fingerprints of what earlier stages hand the stage)."""
  def free_of(value):
    if isinstance(value, dict):
      return {k: free_of(v) for k, v in value.items() if k not in _FREE}
    return value
  assert not set(inputs) & set(keys), (inputs, keys)
  tree = json.loads(config.to_json_best_effort())
  out = {}
  for key in keys:
    value = tree
    for part in key.split("."):
      value = value[part]
    out[key] = free_of(value)
  return json.loads(json.dumps({**out, **inputs}))  # as read back from the file (tuples: lists)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """`key: old -> new` for every entry that differs."""
  a, b = _flat(old), _flat(new)
  return [f"{k.rstrip('.')}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _set_aside(directory: pathlib.Path) -> pathlib.Path:
  """Moves the stage's outputs to the next free stale/<n>/ and returns it."""
  n = 1
  while (directory / STALE / str(n)).exists():
    n += 1
  aside = directory / STALE / str(n)
  aside.mkdir(parents=True)
  for name in (*_OUTPUTS, FILE, *(p.name for p in directory.glob("events.out.tfevents*"))):
    if (directory / name).exists():
      (directory / name).rename(aside / name)
  return aside


def _take_back(directory: pathlib.Path, aside: pathlib.Path) -> None:
  for item in aside.iterdir():
    item.rename(directory / item.name)
  aside.rmdir()


def claim(directory: pathlib.Path, trained_from: dict[str, Any]) -> None:
  """Before `directory`'s stage starts: sets aside checkpoints trained from anything else than
  `trained_from` (taking back ones that were), and records it. A stage trained before this record
  existed is taken as is."""
  path = directory / FILE
  recorded = json.loads(path.read_text()) if path.exists() else None
  if parallel.is_main_process() and recorded is not None and recorded != trained_from:
    checkpoints = directory / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
      aside = _set_aside(directory)
      logging.warning("%s was trained from other settings or inputs (%s): kept in %s", directory,
                      "; ".join(changes(recorded, trained_from)[:6]), aside)
    else:  # a run that stopped before its first checkpoint
      path.unlink()
    earlier = sorted((directory / STALE).iterdir()) if (directory / STALE).is_dir() else []
    match = next((d for d in earlier if (d / FILE).exists()
                  and json.loads((d / FILE).read_text()) == trained_from), None)
    if match is not None:
      _take_back(directory, match)
      logging.warning("%s: taking back its training from these settings and inputs, from %s",
                      directory, match)
  if parallel.is_main_process() and not path.exists():
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(trained_from, indent=1) + "\n")
    tmp.replace(path)
  if jax.process_count() > 1:  # no process opens the checkpoints before they are set aside
    global _claims
    _claims += 1
    ocp.multihost.sync_global_processes(f"avemo_jax_claim_{_claims}", timeout=600,
                                        processes=set(range(jax.process_count())))
