"""What a stage's checkpoints were trained from: WORKDIR/<stage>/trained_from.json.

A stage resumes its checkpoints only when it would train from the same things: the config that
shapes what it learns (its section, the model, the data, the seed) and what earlier stages hand
it (the teacher's weights, the extracted features). Otherwise those checkpoints belong to another
run (a longer teacher, other loss weights): they are moved to WORKDIR/<stage>/stale/, with a
warning naming what changed, and the stage trains again. Bookkeeping, the schedule's length and
the optimizer settings (which a resumed stage takes from its config) may change between runs.
"""
import json
import logging
import pathlib
import shutil
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
_OUTPUTS = ("checkpoints", "metrics.jsonl", "confusion.png", "profile")


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
  return {**out, **inputs}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """`key: old -> new` for every entry that differs."""
  a, b = _flat(old), _flat(new)
  return [f"{k.rstrip('.')}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def claim(directory: pathlib.Path, trained_from: dict[str, Any]) -> None:
  """Before `directory`'s stage starts: set aside checkpoints trained from anything else than
  `trained_from`, and record it. A stage trained before this record existed is taken as is."""
  path = directory / FILE
  recorded = json.loads(path.read_text()) if path.exists() else None
  differ = recorded is not None and recorded != trained_from
  if parallel.is_main_process():
    if differ and (directory / "checkpoints").exists():
      stale = directory / STALE
      shutil.rmtree(stale, ignore_errors=True)
      stale.mkdir()
      for name in (*_OUTPUTS, FILE, *(p.name for p in directory.glob("events.out.tfevents*"))):
        if (directory / name).exists():
          (directory / name).rename(stale / name)
      logging.warning("%s was trained from other settings or inputs (%s): kept in %s; training "
                      "it again", directory, "; ".join(changes(recorded, trained_from)[:6]), stale)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(trained_from, indent=1) + "\n")
    tmp.replace(path)
  if jax.process_count() > 1:  # no process opens the checkpoints before they are set aside
    global _claims
    _claims += 1
    ocp.multihost.sync_global_processes(f"avemo_jax_claim_{_claims}", timeout=600,
                                        processes=set(range(jax.process_count())))
