"""The visual pipeline: teacher stage, then the self-distilled student (DESIGN.md §1.2-1.3)."""
import functools
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avemo_jax import plots
from avemo_jax.data import pipeline, synthetic
from avemo_jax.models import face
from avemo_jax.train import loop, steps
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import Checkpoints
from avemo_jax.train.evaluation import Evaluator

STAGES = ("teacher", "student")


def face_model(m: ml_collections.ConfigDict) -> face.FaceNet:
  return face.FaceNet(cut=m.cut, width=m.width, depth=tuple(m.depth),
                      proj_features=m.proj_features, dense_layers=m.dense_layers,
                      growth=m.growth, feature_dim=m.feature_dim, embed_dim=m.embed_dim,
                      num_classes=m.num_classes, dtype=jnp.dtype(m.dtype))


def load_teacher(path: str, model: face.FaceNet, config: ml_collections.ConfigDict,
                 image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """Teacher variables from a teacher stage directory (or its checkpoints/ folder)."""
  directory = pathlib.Path(path)
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  checkpoints = Checkpoints(directory, max_to_keep=1)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"teacher_checkpoint={path!r}: no Orbax checkpoint in {directory}; "
                            "give a teacher stage directory (WORKDIR/teacher) or its checkpoints/")
  template = state_lib.create(model, config.teacher, jax.random.key(0), image_shape)
  return checkpoints.restore(template, None).variables


def _write_summary(workdir: pathlib.Path, summary: dict[str, Any]) -> None:
  path = workdir / "summary.json"
  tmp = path.with_suffix(".json.tmp")  # never leave a half-written summary behind
  tmp.write_text(json.dumps(summary, indent=2) + "\n")
  tmp.replace(path)


def _finish(workdir: pathlib.Path, name: str, result: dict[str, Any], seconds: float,
            summary: dict[str, Any]) -> None:
  plots.confusion_matrix_png(np.asarray(result["confusion"]), synthetic.EXPRESSIONS,
                             workdir / name / "confusion.png", f"{name}: held-out faces")
  summary[name] = {k: v for k, v in result.items() if k != "predictions"}
  summary[name]["train_seconds"] = round(seconds, 1)
  _write_summary(workdir, summary)
  logging.info("[%s] %s", name, {k: round(v, 4) for k, v in summary[name].items()
                                  if isinstance(v, float)})


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs config.stages in order under workdir; returns (and writes) summary.json's content."""
  unknown = set(config.stages) - set(STAGES)
  if unknown:
    raise ValueError(f"config.stages has unknown {sorted(unknown)}; choose from {STAGES}")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  size = config.data.image_size
  image_shape = (size, size, 3)
  synthetic.save_sample_grid(workdir / "sample_faces.png", seed=config.seed, size=size)
  sources = pipeline.make_sources(config.data, config.seed)
  model = face_model(config.model)
  rng = jax.random.key(config.seed)
  evaluator = Evaluator(model, sources, config.data.eval_batch)
  summary: dict[str, Any] = {}
  teacher_variables, teacher_predictions = None, None

  if "teacher" in config.stages and not config.teacher_checkpoint:
    cfg = config.teacher
    stage = loop.Stage(
        name="teacher", config=cfg,
        step=functools.partial(steps.teacher_step, weights=dict(cfg.loss),
                               margins=tuple(cfg.triplet_margins)),
        step_args=(),
        batches=pipeline.train_iterator(config, cfg, sources, seed=config.seed),
        evaluate=lambda s: evaluator(s.variables))
    start = time.perf_counter()
    state = state_lib.create(model, cfg, jax.random.fold_in(rng, 0), image_shape)
    state, result = loop.train(stage, state, workdir / "teacher", config.max_checkpoints)
    _finish(workdir, "teacher", result, time.perf_counter() - start, summary)
    teacher_variables, teacher_predictions = state.variables, result["predictions"]

  if "student" in config.stages:
    cfg = config.student
    if teacher_variables is None:
      if not config.teacher_checkpoint:
        raise ValueError("the student stage needs a teacher: add 'teacher' to config.stages or "
                         "set --config.teacher_checkpoint=WORKDIR/teacher")
      teacher_variables = load_teacher(config.teacher_checkpoint, model, config, image_shape)
      teacher_predictions = evaluator.predictions(teacher_variables)
    if config.student_init not in ("teacher", "scratch"):
      raise ValueError(f"config.student_init={config.student_init!r}: 'teacher' or 'scratch'")
    init = teacher_variables if config.student_init == "teacher" else None
    stage = loop.Stage(
        name="student", config=cfg,
        step=functools.partial(steps.distill_step, weights=dict(cfg.loss),
                               margins=tuple(cfg.triplet_margins), temperature=cfg.temperature),
        step_args=(teacher_variables,),
        batches=pipeline.train_iterator(config, cfg, sources, seed=config.seed + 10),
        evaluate=lambda s: evaluator(s.variables, teacher_predictions))
    start = time.perf_counter()
    state = state_lib.create(model, cfg, jax.random.fold_in(rng, 1), image_shape, init)
    state, result = loop.train(stage, state, workdir / "student", config.max_checkpoints)
    _finish(workdir, "student", result, time.perf_counter() - start, summary)
  return summary
