"""The stages in order: teacher, self-distilled student, then the audio encoder and fusion (in
av_stages); README, top, says what each does."""
import functools
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from avemo_jax import parallel, plots
from avemo_jax.data import pipeline, synthetic
from avemo_jax.models import fusion, gru_pallas
from avemo_jax.train import av_stages, build, features, loop, provenance, steps
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import load_variables
from avemo_jax.train.evaluation import Evaluator

STAGES = ("teacher", "student", "audio", "fusion")


def _write_json(path: pathlib.Path, content: Any) -> None:
  if not parallel.is_main_process():
    return
  tmp = path.with_suffix(".json.tmp")  # never leave a half-written file behind
  tmp.write_text(json.dumps(content, indent=2) + "\n")
  tmp.replace(path)


def _write_summary(workdir: pathlib.Path, summary: dict[str, Any], stage: str,
                   config: ml_collections.ConfigDict) -> None:
  """summary.json, and the config of the run that finished `stage` as config.json beside it and
  in the stage's folder (tools/export.py reads the architectures, and what the stage read from
  other workdirs, from the latter: a later run in the workdir rewrites only the former). Written
  only once a stage has finished, so a run that fails early leaves an earlier run's config."""
  content = json.loads(config.to_json_best_effort())
  _write_json(workdir / stage / "config.json", content)
  _write_json(workdir / "config.json", content)
  _write_json(workdir / "summary.json", summary)


def _finish(workdir: pathlib.Path, name: str, result: dict[str, Any], summary: dict[str, Any],
            config: ml_collections.ConfigDict) -> None:
  if parallel.is_main_process():
    plots.confusion_matrix_png(np.asarray(result["confusion"]),
                               synthetic.EXPRESSIONS[:len(result["confusion"])],
                               workdir / name / "confusion.png", f"{name}: held-out faces")
  summary[name] = {k: v for k, v in result.items() if k != "predictions"}
  _write_summary(workdir, summary, name, config)
  logging.info("[%s] %s", name, {k: round(v, 4) for k, v in summary[name].items()
                                  if isinstance(v, float)})


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs config.stages in order under workdir; returns (and writes) summary.json's content.

  Entries of stages that are not rerun (e.g. the visual stages when fusion reuses a student)
  are kept from an existing summary.json.
  """
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "summary.json"
  summary: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
  par = parallel.DataParallel(config.parallel.backend)
  student = None
  if {"teacher", "student"} & set(config.stages):
    student = _visual_stages(config, workdir, summary, par)
  if "audio" in config.stages or "fusion" in config.stages:
    av_stages.run(config, workdir, summary, student, par,
                  write_summary=functools.partial(_write_summary, config=config))
  return summary


def validate(config: ml_collections.ConfigDict) -> None:
  """The config errors that can be found before any long work starts, each naming its key."""
  unknown = set(config.stages) - set(STAGES)
  if unknown:
    raise ValueError(f"config.stages has unknown {sorted(unknown)}; choose from {STAGES}")
  build.compute_dtype(config.dtype)
  for key, seed in (("seed", config.seed), ("fusion.seed", config.fusion.seed)):
    if seed < 0:  # NumPy's generators (the data, the batch order) take none
      raise ValueError(f"config.{key}={seed}: must be >= 0")
  wrong_models = set(config.fusion.models) - set(av_stages.MODEL_MODALITIES)
  if wrong_models:
    raise ValueError(f"config.fusion.models has {sorted(wrong_models)}; choose from "
                     f"{tuple(av_stages.MODEL_MODALITIES)}")
  if config.fusion.level not in ("feature", "model"):
    raise ValueError(f"config.fusion.level={config.fusion.level!r}: 'feature' or 'model'")
  if config.fusion.gru_kernel not in fusion.KERNELS:
    raise ValueError(f"config.fusion.gru_kernel={config.fusion.gru_kernel!r}: choose one of "
                     f"{fusion.KERNELS}")
  if config.fusion.gru_kernel == "pallas" and fusion.runs_kernel("pallas", config.fusion.hidden):
    fusion.check_kernel("pallas")
  elif config.fusion.gru_kernel == "pallas":
    logging.warning("config.fusion.gru_kernel='pallas' runs on one NVIDIA GPU, GRUs of up to %d "
                    "units; here (%d %s devices, fusion.hidden=%d) the GRUs run as a lax.scan",
                    gru_pallas.MAX_UNITS, jax.device_count(), jax.default_backend(),
                    config.fusion.hidden)
  for run, name, stage in (("teacher", "teacher", config.teacher),
                           ("student", "student", config.student),
                           ("audio", "audio.train", config.audio.train),
                           ("fusion", "fusion.train", config.fusion.train)):
    if stage.on_nonfinite not in ("stop", "skip"):
      raise ValueError(f"config.{name}.on_nonfinite={stage.on_nonfinite!r}: 'stop' or 'skip'")
    if stage.profile_steps < 0 or stage.profile_first < 1:
      raise ValueError(f"config.{name}.profile_steps={stage.profile_steps} (>= 0, 0: no profile),"
                       f" profile_first={stage.profile_first} (>= 1: the first step run)")
    for key, least in (("num_steps", 0), ("log_every", 1), ("eval_every", 0),
                       ("checkpoint_every", 0), ("checkpoint_every_secs", 0)):
      if stage[key] < least:
        raise ValueError(f"config.{name}.{key}={stage[key]}: must be >= {least}")
    if "triplet_margins" in stage and len(stage.triplet_margins) != 3:
      raise ValueError(f"config.{name}.triplet_margins={tuple(stage.triplet_margins)}: one margin "
                       "per FEC triplet type (one-, two-, three-class)")
    for key in ("batch_faces", "batch_triplets", "batch_unlabelled", "batch"):
      if run in config.stages and key in stage and (stage[key] or key != "batch_unlabelled"):
        parallel.process_batch(stage[key], f"{name}.{key}")
  for key, stage in (("face_backbone", "teacher"), ("audio", "audio")):
    path = config.init[key]
    if path and stage in config.stages and not (pathlib.Path(path) / "conversion.json").is_file():
      raise FileNotFoundError(f"config.init.{key}={path}: no conversion.json there; give the --out "
                              f"of tools/convert_{'facenet' if stage == 'teacher' else 'vggish'}.py")
  if config.max_checkpoints < 1:
    raise ValueError(f"config.max_checkpoints={config.max_checkpoints}: keep at least 1 per stage "
                     "(the last one is what a later stage and tools/export.py read)")
  if config.student_init not in ("teacher", "scratch"):
    raise ValueError(f"config.student_init={config.student_init!r}: 'teacher' or 'scratch'")
  for stage, upstream in (("student", "teacher"), ("fusion", "student"), ("fusion", "audio")):
    key = f"{upstream}_checkpoint"
    if config[key] and not pathlib.Path(config[key]).is_dir():
      raise FileNotFoundError(f"config.{key}={config[key]}: no such directory; give the "
                              f"{upstream} directory of a trained workdir (WORKDIR/{upstream})")
    if stage in config.stages and upstream not in config.stages and not config[key]:
      raise ValueError(f"the {stage} stage needs a trained {upstream}: add '{upstream}' to "
                       f"config.stages or set --config.{key}=WORKDIR/{upstream}")
  if config.data.source not in ("synthetic", "tfds") or (config.data.source == "tfds"
                                                         and not config.data.data_dir):
    raise ValueError(f"config.data.source={config.data.source!r}, config.data.data_dir="
                     f"{config.data.data_dir!r}: 'synthetic', or 'tfds' with the --data_dir of "
                     "tools/prepare_*.py")
  if config.data.source == "tfds":  # each prepared data set the stages read, before any trains
    if config.data.affectnet_classes != config.model.num_classes:
      raise ValueError(f"config.data.affectnet_classes={config.data.affectnet_classes} but "
                       f"config.model.num_classes={config.model.num_classes}: set them equal")
    if {"teacher", "student"} & set(config.stages):
      pipeline.make_sources(config.data, config.seed)
    if {"audio", "fusion"} & set(config.stages):
      for split in ("train", "dev"):
        pipeline.recordings(config, split)


def _visual_stages(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   summary: dict[str, Any], par: parallel.DataParallel
                   ) -> dict[str, Any] | None:
  """Teacher, then student; returns the student's variables (single-device) when the student
  stage ran."""
  size = config.data.image_size
  if parallel.is_main_process() and config.data.source == "synthetic":
    synthetic.save_sample_grid(workdir / "sample_faces.png", seed=config.seed, size=size)
  sources = pipeline.make_sources(config.data, config.seed)
  model = build.face_model(config.model, dtype=config.dtype, axis_name=par.axis_name)
  rng = jax.random.key(config.seed)
  evaluator = Evaluator(model, sources, config.data.eval_batch, config.data.num_threads)
  teacher_variables, teacher_predictions = None, None

  if "teacher" in config.stages and not config.teacher_checkpoint:
    cfg = config.teacher

    def init() -> state_lib.TrainState:
      state = state_lib.create(model, cfg, jax.random.fold_in(rng, 0), build.face_inputs(size))
      if config.init.face_backbone:  # the paper's start: a converted VGGFace2 FaceNet trunk
        state = state_lib.start_from(state, config.init.face_backbone, "facenet", at=("trunk",),
                                     what="config.init.face_backbone", section="config.model")
      return state

    stage = loop.Stage(
        name="teacher", config=cfg,
        step=functools.partial(steps.teacher_step, weights=dict(cfg.loss),
                               margins=tuple(cfg.triplet_margins)),
        step_args=(), init=init,
        batches=pipeline.train_iterator(config, "teacher", sources, seed=config.seed),
        evaluate=lambda s: evaluator(s.variables),
        trained_from=provenance.settings(config, "teacher", "model", "data", "seed",
                                         "init.face_backbone"))
    state, result = loop.train(stage, workdir / "teacher", config.max_checkpoints, par)
    _finish(workdir, "teacher", result, summary, config)
    teacher_variables, teacher_predictions = parallel.local(state.variables), result["predictions"]

  if "student" not in config.stages:
    return None
  cfg = config.student
  if teacher_variables is None:  # config.teacher_checkpoint (checked in validate)
    template = jax.eval_shape(lambda: state_lib.create(model, config.teacher, rng,
                                                       build.face_inputs(size)))
    teacher_variables = load_variables(config.teacher_checkpoint, template,
                                       "config.teacher_checkpoint")
    teacher_predictions = evaluator.predictions(teacher_variables)
  initial = teacher_variables if config.student_init == "teacher" else None
  stage = loop.Stage(
      name="student", config=cfg,
      step=functools.partial(steps.distill_step, weights=dict(cfg.loss),
                             margins=tuple(cfg.triplet_margins), temperature=cfg.temperature),
      step_args=(teacher_variables,),
      init=lambda: state_lib.create(model, cfg, jax.random.fold_in(rng, 1),
                                    build.face_inputs(size), initial),
      batches=pipeline.train_iterator(config, "student", sources, seed=config.seed + 10),
      evaluate=lambda s: evaluator(s.variables, teacher_predictions),
      trained_from=provenance.settings(config, "student", "model", "data", "seed", "student_init",
                                       teacher=features.fingerprint(teacher_variables)))
  state, result = loop.train(stage, workdir / "student", config.max_checkpoints, par)
  _finish(workdir, "student", result, summary, config)
  return parallel.local(state.variables)
