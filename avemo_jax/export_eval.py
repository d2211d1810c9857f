"""Held-out evaluation of exported models with the training run's data and metric code.

The models come from the export only (`avemo_jax.export.load`); the data sources (`pipeline`), the
face `Evaluator`, the CCC report and the plots are the ones training uses, so an export of a
run's final checkpoints, evaluated on that run's data (the exported config.json's data settings),
gives the numbers of the run's summary.json:

- face models: acc8, acc7, macro F1, confusion, FEC triplet accuracy (overall and per type), and
  the student's agreement with the teacher when both are exported;
- audio encoder: CCC on the dev clips;
- fusion models: dev CCC (recordings concatenated, and the per-recording mean; also per
  condition), on per-frame features computed through the exported student and audio encoder
  (the export's fusion/<model>/../../{student,audio}) as the fusion stage computes them, or on
  the run's cached dev features (`features_from=WORKDIR`).

Through the exported extractors the dev CCCs agree with summary.json to about 1e-6 (the
extractors' float32 rounding differs from the training-time jit's); on the cached features, to
about 1e-8. Face metrics are equal.
"""
import json
import logging
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from avemo_jax import metrics, plots
from avemo_jax.data import audio_features, pipeline, sequences
from avemo_jax.exported import MANIFEST, Model, load
from avemo_jax.train import av_stages, features
from avemo_jax.train.evaluation import Evaluator


class _FaceApply:
  """An exported face model behind the `apply` that the training Evaluator calls."""

  def __init__(self, model: Model):
    self.call = model.exported.call

  def apply(self, variables, images, *, train: bool):
    del train  # exported in eval mode
    out = self.call(variables, {"images": images.astype(jnp.float32)})
    return out["logits"], {"embedding": out["embedding"], "feature": out["feature"]}


def evaluate(root: str | pathlib.Path, out: str | pathlib.Path, *, data: str | None = None,
             data_dir: str | None = None, features_from: str | None = None) -> dict[str, Any]:
  """Evaluates every model under `root` (tools/export.py's --out, or one model directory);
  writes out/evaluation.json (summary.json's layout), confusion_<model>.png, dev_NN.png.

  `data` / `data_dir` replace the exported config's data source; `features_from` (a workdir)
  gives fusion models that run's cached dev features instead of the exported extractors'.
  """
  root, out = pathlib.Path(root), pathlib.Path(out)
  models = {m.manifest["name"]: m for m in map(load, sorted(
      p.parent for p in root.rglob("manifest.json")
      if not any(part.startswith(".") for part in p.relative_to(root).parts)))}  # .partial
  if not models:
    raise FileNotFoundError(f"{root} holds no exported model (no manifest.json): give the --out "
                            "of tools/export.py or one model directory in it")
  config = ml_collections.ConfigDict(next(iter(models.values())).config)
  if data:
    config.data.source = data
  if data_dir:
    config.data.data_dir = data_dir
  out.mkdir(parents=True, exist_ok=True)
  result: dict[str, Any] = {"export": str(root.resolve()), "data": config.data.to_dict()}
  faces = {n: m for n, m in models.items() if m.manifest["kind"] == "face"}
  if faces:
    sources = pipeline.make_sources(config.data, config.seed)
    teacher_predictions = None
    for name, model in sorted(faces.items(), key=lambda kv: kv[0] != "teacher"):
      evaluator = Evaluator(_FaceApply(model), sources, config.data.eval_batch,
                            config.data.num_threads)
      reference = teacher_predictions if name == "student" else None
      scores = evaluator(model.variables, reference)
      if name == "teacher":
        teacher_predictions = scores["predictions"]
      result[name] = {k: v for k, v in scores.items() if k != "predictions"}
      plots.confusion_matrix_png(np.asarray(scores["confusion"]), model.manifest["classes"],
                                 out / f"confusion_{name}.png", f"{name} (export): held-out faces")
  if "audio" in models:
    result["audio"] = _audio(models["audio"], config)
  fusion = {n.split("/")[1]: m for n, m in models.items() if m.manifest["kind"] == "fusion"}
  if fusion:
    result.update(_fusion(fusion, config, out, features_from))
  (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
  logging.info("evaluation: %s", out / "evaluation.json")
  return result


def _audio(model: Model, config) -> dict[str, float]:
  """As the audio stage's evaluation: clip valence/arousal CCC on the dev clips."""
  dev = pipeline.clips(config, "dev")
  clips = [dev[i] for i in range(len(dev))]
  mel = np.stack([audio_features.waveform_to_examples(c["audio"], sequences.SAMPLE_RATE)[0]
                  for c in clips])
  labels = np.stack([c["labels"] for c in clips])
  pred = features.batched(lambda x: model(mel=x)["valence_arousal"], mel, config.audio.train.batch)
  return {f"ccc_{name}": metrics.ccc(pred[:, d], labels[:, d])
          for d, name in enumerate(("valence", "arousal"))}


def _check_extractors(model: Model, fingerprints: dict[str, str], where: str) -> None:
  """Refuses features of other extractors than the ones the fusion model was trained on."""
  want = model.manifest["preprocessing"]["extractor_fingerprints"]
  for modality, got in fingerprints.items():
    if got != want[modality]:
      raise ValueError(f"{model.directory} was trained on {modality} features of the extractor "
                       f"{want[modality]}, but {where} has {got}: use the export (or workdir) "
                       "whose student and audio stages fed this fusion stage")


def _dev_features(model: Model, config, features_from: str | None) -> dict[str, np.ndarray]:
  """Raw per-frame dev features: from the exported extractors beside the fusion export, or
  from a workdir's cache."""
  if features_from:
    path = pathlib.Path(features_from) / "fusion" / "features_dev.npz"
    with np.load(path) as f:
      key = json.loads(str(f["key"]))
      _check_extractors(model, {"visual": key["student"], "audio": key["audio"]}, str(path))
      return {k: f[k] for k in f.files if k != "key"}
  root = model.directory.resolve().parent.parent  # EXPORT of EXPORT/fusion/<name> (also ".")
  missing = [n for n in ("student", "audio") if not (root / n / MANIFEST).is_file()]
  if missing:
    raise FileNotFoundError(
        f"{root} has fusion models but no {' or '.join(f'{n}/' for n in missing)} export, the "
        "extractors of their features: export the fusion run's workdir again with "
        "tools/export.py (it also exports the student and audio encoder the run read from "
        "another workdir), or give --features_from=WORKDIR")
  student, audio = load(root / "student", "face"), load(root / "audio", "audio")
  _check_extractors(model, {"visual": student.manifest["source"]["fingerprint"],
                            "audio": audio.manifest["source"]["fingerprint"]}, str(root))
  return features.extract(pipeline.recordings(config, "dev"),
                          face_fn=lambda x: student(images=x)["feature"],
                          audio_fn=lambda x: audio(mel=x)["embedding"],
                          batch=config.sequences.feature_batch, num_threads=config.data.num_threads)


def _fusion(models: dict[str, Model], config, out: pathlib.Path,
            features_from: str | None) -> dict[str, Any]:
  """As the fusion stage's evaluation: dev CCC per model and per condition, and the plots."""
  dev = _dev_features(next(iter(models.values())), config, features_from)
  lengths, labels = dev["lengths"], dev["labels"]
  names, gaps = av_stages.dev_recordings(config)
  report, predictions = {}, {}
  for name in [n for n in av_stages.MODEL_MODALITIES if n in models]:
    model = models[name]
    inputs = {m: dev[m] for m in model.manifest["modalities"]}
    predictions[name] = np.asarray(model(**inputs, lengths=lengths)["valence_arousal"])
    report[name] = metrics.ccc_report([p[:n] for p, n in zip(predictions[name], lengths)],
                                      [y[:n] for y, n in zip(labels, lengths)], names)
  for r, n in enumerate(lengths):
    plots.valence_arousal_png(labels[r, :n], {k: v[r, :n] for k, v in predictions.items()},
                              out / f"{names[r]}.png", f"{names[r]} (export)", gaps=gaps[r])
  return {"fusion": report,
          "fusion_by_condition": av_stages.by_condition(gaps, labels, predictions, lengths)}
