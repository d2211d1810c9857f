"""The audio encoder stage and the fusion stage (README, *Audio encoder* and *Fusion*).

audio:  VGGish regresses clip-level valence/arousal of synthetic voice clips -> WORKDIR/audio.
fusion: per-frame features of the frozen student and audio encoder (cached), then one GRU per
        entry of config.fusion.models (audio-only, visual-only, fused) -> WORKDIR/fusion/<model>,
        dev CCCs in summary.json["fusion"] (and per condition: both modalities present, voice
        silent, face hidden, in ["fusion_by_condition"]) and a valence/arousal plot per dev
        recording with the missing-modality stretches shaded.
"""
import functools
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from avemo_jax import metrics, parallel, plots
from avemo_jax.data import audio_features, pipeline, recola, recola_files, sequences
from avemo_jax.train import build, features, loop, provenance, steps
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import load_variables

MODEL_MODALITIES = {"audio": ("audio",), "visual": ("visual",), "fused": ("visual", "audio")}
# Per modality, the entries of the feature cache key that describe its extractor.
_EXTRACTORS = {"visual": ("student",), "audio": ("audio", "embedding_relu")}


def _unused_extractors(modalities: tuple[str, ...]) -> set[str]:
  """The feature key's entries that a model of `modalities` does not read."""
  return {entry for m, entries in _EXTRACTORS.items() if m not in modalities for entry in entries}


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, summary: dict[str, Any],
        student_variables: dict[str, Any] | None, par: parallel.DataParallel,
        write_summary: Callable) -> None:
  audio_variables = None
  if "audio" in config.stages:
    audio_variables = _audio_stage(config, workdir, summary, par, write_summary)
  if "fusion" in config.stages:
    if student_variables is None:
      student_variables = _load(config, "student_checkpoint",
                                build.face_model(config.model, dtype=config.dtype),
                                config.student, build.face_inputs(config.data.image_size))
    if audio_variables is None:
      audio_variables = _load(config, "audio_checkpoint",
                              build.audio_model(config.audio, dtype=config.dtype),
                              config.audio.train, build.audio_inputs())
    _fusion_stage(config, workdir, summary, par, write_summary, student_variables,
                  audio_variables)


def _load(config, key: str, model, stage_cfg, inputs) -> dict[str, Any]:
  """The variables of config.`key` (set and existing: stages.validate)."""
  template = jax.eval_shape(lambda: state_lib.create(model, stage_cfg, jax.random.key(0), inputs))
  return load_variables(config[key], template, f"config.{key}")


def _audio_stage(config, workdir: pathlib.Path, summary, par, write_summary) -> dict[str, Any]:
  cfg = config.audio.train
  model = build.audio_model(config.audio, dtype=config.dtype)
  dev = pipeline.clips(config, "dev")
  dev = [dev[i] for i in range(len(dev))]
  dev_mel = np.stack([audio_features.waveform_to_examples(c["audio"], sequences.SAMPLE_RATE)[0]
                      for c in dev])
  dev_labels = np.stack([c["labels"] for c in dev])
  predict = jax.jit(lambda v, x: model.apply(v, x)[0])

  def evaluate(state) -> dict[str, Any]:
    pred = features.batched(functools.partial(predict, state.variables), dev_mel, cfg.batch)
    return {f"ccc_{name}": metrics.ccc(pred[:, d], dev_labels[:, d])
            for d, name in enumerate(("valence", "arousal"))}

  def init() -> state_lib.TrainState:
    state = state_lib.create(model, cfg, jax.random.key(config.seed + 2), build.audio_inputs())
    if config.init.audio:  # converted AudioSet VGGish; the valence/arousal head is ours
      state = state_lib.start_from(state, config.init.audio, "vggish", keep=("va_head",),
                                   what="config.init.audio", section="config.audio")
    return state

  stage = loop.Stage(
      name="audio", config=cfg, step=functools.partial(steps.audio_step, weights=dict(cfg.loss)),
      step_args=(), init=init,
      batches=pipeline.clip_iterator(pipeline.clips(config, "train"), seed=config.seed,
                                     batch=cfg.batch, data=config.data),
      evaluate=evaluate,
      trained_from=provenance.settings(config, "audio", "sequences", "seed", "init.audio",
                                       "data.source", "data.data_dir"))
  state, summary["audio"] = loop.train(stage, workdir / "audio", config.max_checkpoints, par)
  write_summary(workdir, summary, "audio")
  logging.info("[audio] dev clips %s", summary["audio"])
  return parallel.local(state.variables)


def _features(config, workdir: pathlib.Path, student_variables, audio_variables
              ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """Cached per-frame features of the train and dev recordings, and their cache key."""
  seq, size = config.sequences, config.data.image_size
  face = build.face_model(config.model, dtype=config.dtype)
  audio = build.audio_model(config.audio, dtype=config.dtype)
  face_fn = jax.jit(lambda x: face.apply(student_variables, x, train=False)[1]["feature"])
  audio_fn = jax.jit(lambda x: audio.apply(audio_variables, x)[1]["embedding"])
  if config.data.source == "tfds":
    data = {"data_dir": str(pathlib.Path(config.data.data_dir).resolve()),
            "crop_margin": config.data.crop_margin,
            "prepared": recola.fingerprint(config.data.data_dir, image_size=size,
                                           margin=config.data.crop_margin)}
  else:
    data = {"seed": config.seed, "generator": sequences.VERSION, "sequences": seq.to_dict()}
  key = {**data, "image_size": size, "dtype": build.dtype_name(config.dtype),
         "student": features.fingerprint(student_variables),
         "audio": features.fingerprint(audio_variables),
         "embedding_relu": config.audio.embedding_relu}  # not in the audio weights' fingerprint
  out = {}
  for split in ("train", "dev"):
    recordings = pipeline.recordings(config, split)
    out[split] = features.cached(
        workdir / "fusion" / f"features_{split}.npz", {**key, "split": split},
        lambda r=recordings: features.extract(r, face_fn=face_fn, audio_fn=audio_fn,
                                              batch=seq.feature_batch,
                                              num_threads=config.data.num_threads))
  return out, key


def _fusion_stage(config, workdir: pathlib.Path, summary, par, write_summary, student_variables,
                  audio_variables) -> None:
  cfg, seed = config.fusion.train, config.seed + config.fusion.seed
  start = time.perf_counter()
  raw, key = _features(config, workdir, student_variables, audio_variables)
  feats = features.standardize(raw, ("visual", "audio"))
  summary["fusion_features_seconds"] = round(time.perf_counter() - start, 1)
  logging.info("[fusion] features ready in %.0f s", summary["fusion_features_seconds"])
  dev = feats["dev"]
  lengths = dev["lengths"]
  names, gaps = dev_recordings(config)
  report, dev_predictions = {}, {}
  for name in config.fusion.models:  # names checked by stages.validate
    modalities = MODEL_MODALITIES[name]
    model = build.fusion_model(config.fusion, modalities)
    predict = jax.jit(lambda v, x, n, model=model: model.apply(v, x, n)[0])

    def evaluate(state, modalities=modalities, predict=predict) -> dict[str, Any]:
      pred = np.asarray(predict(state.variables, {m: dev[m] for m in modalities}, lengths))
      result = metrics.ccc_report([p[:n] for p, n in zip(pred, lengths)],
                                  [y[:n] for y, n in zip(dev["labels"], lengths)], names)
      return {**result, "predictions": pred}

    train = {k: feats["train"][k] for k in (*modalities, "labels", "lengths")}
    dims = {m: train[m].shape[-1] for m in modalities}
    stage = loop.Stage(
        name=f"fusion/{name}", config=cfg,
        step=functools.partial(steps.fusion_step, frames=config.fusion.chunk_frames,
                               weights=dict(cfg.loss), seed=seed),
        step_args=(train,),  # on the device, whole; the batches say which windows to train on
        init=lambda model=model, dims=dims: state_lib.create(
            model, cfg, jax.random.key(seed + 3), build.fusion_inputs(dims)),
        batches=pipeline.chunk_iterator(train["lengths"], seed=seed, batch=cfg.batch,
                                        frames=config.fusion.chunk_frames, data=config.data),
        evaluate=evaluate,
        trained_from=provenance.settings(config, "fusion", "seed", features={
            k: v for k, v in key.items() if k not in _unused_extractors(modalities)}))
    _, result = loop.train(stage, workdir / "fusion" / name, config.max_checkpoints, par)
    dev_predictions[name] = result.pop("predictions")
    report[name] = result
    logging.info("[fusion/%s] dev %s", name, {k: round(v, 4) for k, v in result.items()
                                               if isinstance(v, float)})
  plot_dir = workdir / "fusion" / "plots"
  plot_dir.mkdir(parents=True, exist_ok=True)
  for r, n in enumerate(lengths if parallel.is_main_process() else ()):
    plots.valence_arousal_png(dev["labels"][r, :n],
                              {k: v[r, :n] for k, v in dev_predictions.items()},
                              plot_dir / f"{names[r]}.png", names[r], gaps=gaps[r])
  summary["fusion"] = report
  summary["fusion_by_condition"] = by_condition(gaps, dev["labels"], dev_predictions, lengths)
  write_summary(workdir, summary, "fusion")


def dev_recordings(config) -> tuple[list[str], list[dict[str, np.ndarray]]]:
  """The dev recordings' names and, per recording, bool [T] masks of the frames where a modality
  is missing: synthetic, the voice silent / the face hidden; RECOLA, the frames without their own
  face detection. Fewer than RECOLA's 9 dev recordings (some skipped when prepared) is warned of:
  such CCCs are not comparable with published ones."""
  recordings = pipeline.recordings(config, "dev")
  if config.data.source == "tfds":
    if len(recordings) < recola_files.DEV_RECORDINGS:
      logging.warning("the dev CCCs cover %d of RECOLA's %d dev recordings (%s): the others are "
                      "not in the prepared data (absent from --manual_dir, or skipped: "
                      "prepare_recola.py's report says why); they are not comparable with "
                      "published numbers", len(recordings),
                      recola_files.DEV_RECORDINGS, ", ".join(recordings.names))
    return recordings.names, [{"face not detected": ~recordings[r].detected}
                              for r in range(len(recordings))]
  return recordings.names, [{"voice silent": ~rec.speaking, "face hidden": ~rec.visible} for rec in
                            (recordings[r] for r in range(len(recordings)))]


def by_condition(gaps, labels, predictions, lengths) -> dict[str, dict[str, Any]]:
  """Dev CCC (recordings concatenated) of each model on the frames where both modalities are
  present and on those where each gap applies: where fusion earns its keep."""
  select = {"both present": lambda g: ~np.logical_or.reduce(list(g.values())),
            **{name: lambda g, name=name: g[name] for name in gaps[0]}}
  out = {}
  for condition, mask_of in select.items():
    masks = [mask_of(g)[:n] for g, n in zip(gaps, lengths)]
    pick = lambda x: np.concatenate([x[r, :n][m] for r, (n, m) in enumerate(zip(lengths, masks))])
    truth = pick(labels)
    out[condition] = {"frames": len(truth)}
    for name, pred in predictions.items() if len(truth) > 1 else ():
      out[condition][name] = {f"ccc_{dim}": metrics.ccc(pick(pred)[:, d], truth[:, d])
                              for d, dim in enumerate(("valence", "arousal"))}
  return out
