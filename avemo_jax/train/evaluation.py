"""Held-out evaluation of a face network: classification, FEC triplets, teacher agreement."""
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from avemo_jax import metrics
from avemo_jax.data import pipeline
from avemo_jax.train import steps


class Evaluator:
  """Evaluates any variables of `model` on the test sets, read anew (Grain threads) each time.

  Faces and triplets are fed in batches of the same number of images, so the eval forward
  pass compiles once.
  """

  def __init__(self, model: nn.Module, sources: pipeline.Sources, eval_batch: int,
               num_threads: int = 2):
    if eval_batch % 3:
      raise ValueError(f"eval_batch={eval_batch} must be divisible by 3 (triplets)")
    self.faces = pipeline.eval_batches(sources.test_faces, eval_batch, ("image", "label"),
                                       num_threads)
    self.triplets = pipeline.eval_batches(
        sources.test_triplets, eval_batch // 3, ("images", "label", "triplet_type"), num_threads)
    self.num_faces, self.batch = len(sources.test_faces), eval_batch
    self._predict = jax.jit(functools.partial(steps.predict, apply_fn=model.apply))

  def predictions(self, variables) -> np.ndarray:
    """Argmax classes of the test faces."""
    out = [np.argmax(np.asarray(self._predict(variables, b["image"])[0]), -1) for b in self.faces]
    return np.concatenate(out)[:self.num_faces]

  def __call__(self, variables, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Summary metrics; with `reference` (a teacher's test predictions), teacher_agreement."""
    bs = self.batch
    ref = np.full(-(-self.num_faces // bs) * bs, -1)
    if reference is not None:
      ref[:len(reference)] = reference
    face_metrics, preds = None, []
    for i, b in enumerate(self.faces):
      logits, _ = self._predict(variables, b["image"])
      preds.append(np.argmax(np.asarray(logits), -1))
      update = metrics.FaceMetrics.single_from_model_output(
          logits=logits, labels=b["label"], agreement=preds[-1] == ref[i * bs:(i + 1) * bs],
          mask=b["label"] >= 0)
      face_metrics = update if face_metrics is None else face_metrics.merge(update)
    triplet_metrics = None
    for b in self.triplets:
      t = b["images"].shape[0]
      _, emb = self._predict(variables, b["images"].reshape(-1, *b["images"].shape[2:]))
      update = metrics.TripletMetrics.single_from_model_output(
          embeddings=emb.reshape(t, 3, -1), labels=b["label"], triplet_type=b["triplet_type"])
      triplet_metrics = update if triplet_metrics is None else triplet_metrics.merge(update)
    summary = metrics.summarize(face_metrics, triplet_metrics, reference is not None,
                                num_classes=logits.shape[-1])
    summary["predictions"] = np.concatenate(preds)[:self.num_faces]
    return summary
