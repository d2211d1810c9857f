"""Evaluation metrics (README, *Metrics*), accumulated on device with clu and reduced on the host.

- acc8 / acc7: accuracy over the 8 AffectNet classes (8-class models only), and over 7 with
  Contempt (code 7) dropped from both the labels and the predicted classes.
- macro_f1 / macro_f1_7: unweighted mean of the per-class F1 scores over 8 classes (8-class
  models only) and over 7, each over the classes in the labels or the predictions (sklearn's
  `f1_score(average="macro")`): a class the test set lacks and the model never predicts is not
  counted as 0. `test_faces_per_class` gives each class's support.
- fec_triplet_acc: a triplet is right when the two similar faces are closer to each other than
  both are to the odd one (squared L2 of the embeddings), overall and per triplet type, with the
  number of test triplets per type (`fec_triplets_<type>`; an accuracy of none is None).
- teacher_agreement: fraction of faces where the student's and teacher's argmax classes agree.
- ccc: concordance correlation coefficient with population (1/N) moments, reported for valence
  and arousal both over all dev recordings concatenated (the AVEC convention, `ccc_valence`) and
  as the mean of per-recording values (`ccc_valence_mean`).
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from avemo_jax import losses

TRIPLET_TYPE_NAMES = ("one_class", "two_class", "three_class")


def _confusion(num_classes: int):
  """A clu metric counting (true, predicted) over the first `num_classes` classes.

  Labels outside [0, num_classes) (padding -1, or Contempt for 7 classes) are not counted.
  """

  @flax.struct.dataclass
  class Confusion(clu_metrics.Metric):
    counts: jax.Array  # [true, predicted]

    @classmethod
    def from_model_output(cls, *, logits: jax.Array, labels: jax.Array, **_) -> "Confusion":
      pred = jnp.argmax(logits[..., :num_classes], axis=-1)
      keep = (labels >= 0) & (labels < num_classes)
      index = jnp.where(keep, labels, 0) * num_classes + pred
      counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(keep.astype(jnp.int32))
      return cls(counts=counts.reshape(num_classes, num_classes))

    def merge(self, other: "Confusion") -> "Confusion":
      return type(self)(counts=self.counts + other.counts)

    def compute(self) -> jax.Array:
      return self.counts

  return Confusion


@flax.struct.dataclass
class TripletCounts(clu_metrics.Metric):
  """Correct and total FEC triplets per type (padding has type -1)."""
  correct: jax.Array  # [3]
  total: jax.Array  # [3]

  @classmethod
  def from_model_output(cls, *, embeddings: jax.Array, labels: jax.Array, triplet_type: jax.Array,
                        **_) -> "TripletCounts":
    right = losses.triplet_correct(embeddings, labels).astype(jnp.int32)
    onehot = jax.nn.one_hot(triplet_type, 3, dtype=jnp.int32)  # all-zero for -1
    return cls(correct=right @ onehot, total=onehot.sum(0))

  def merge(self, other: "TripletCounts") -> "TripletCounts":
    return type(self)(correct=self.correct + other.correct, total=self.total + other.total)

  def compute(self) -> tuple[jax.Array, jax.Array]:
    return self.correct, self.total


@flax.struct.dataclass
class FaceMetrics(clu_metrics.Collection):
  confusion8: _confusion(8)
  confusion7: _confusion(7)
  teacher_agreement: clu_metrics.Average.from_output("agreement")  # noqa: F821 (a name, not a type)


@flax.struct.dataclass
class TripletMetrics(clu_metrics.Collection):
  triplets: TripletCounts


def macro_f1(confusion: np.ndarray) -> float:
  """Unweighted mean of F1 = 2 tp / (2 tp + fp + fn) over the classes with tp + fp + fn > 0."""
  tp = np.diag(confusion).astype(np.float64)
  denom = 2 * tp + (confusion.sum(0) - tp) + (confusion.sum(1) - tp)
  return float(np.mean(2 * tp[denom > 0] / denom[denom > 0])) if denom.any() else 0.0


def _ratio(right, total) -> float | None:
  return float(right / total) if total else None


def accuracy(confusion: np.ndarray) -> float | None:
  return _ratio(np.trace(confusion), confusion.sum())


def summarize(faces: FaceMetrics, triplets: TripletMetrics | None, with_agreement: bool,
              num_classes: int = 8) -> dict[str, Any]:
  """Host-side reduction to plain numbers (and the confusion matrix of the model's
  `num_classes` as nested lists)."""
  values = faces.compute()
  c8, c7 = np.asarray(values["confusion8"]), np.asarray(values["confusion7"])
  out: dict[str, Any] = {"acc8": accuracy(c8), "macro_f1": macro_f1(c8)} if num_classes == 8 else {}
  out.update(acc7=accuracy(c7), macro_f1_7=macro_f1(c7),
             test_faces_per_class=c8.sum(1)[:num_classes].tolist())
  if with_agreement:
    out["teacher_agreement"] = float(values["teacher_agreement"])
  if triplets is not None:
    correct, total = (np.asarray(v) for v in triplets.compute()["triplets"])
    out["fec_triplet_acc"] = _ratio(correct.sum(), total.sum())
    for name, c, t in zip(TRIPLET_TYPE_NAMES, correct, total):
      out[f"fec_triplet_acc_{name}"] = _ratio(c, t)
      out[f"fec_triplets_{name}"] = int(t)
  out["confusion"] = c8[:num_classes, :num_classes].tolist()
  return out


def ccc(x: np.ndarray, y: np.ndarray) -> float:
  """CCC of two 1-D arrays in float64: 2 cov / (var x + var y + (mean x - mean y)^2)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape or not x.size:
    raise ValueError(f"ccc needs two non-empty 1-D arrays of one length, got {x.shape} and "
                     f"{y.shape}")
  cov = np.mean((x - x.mean()) * (y - y.mean()))
  denom = x.var() + y.var() + (x.mean() - y.mean()) ** 2
  return float(2 * cov / denom) if denom > 0 else 0.0


def ccc_report(preds: list[np.ndarray], targets: list[np.ndarray],
               names: list[str] | None = None) -> dict[str, Any]:
  """CCC per dimension of per-recording [T_r, 2] (valence, arousal) predictions: concatenated
  over recordings (`ccc_valence`) and the mean of per-recording values (`ccc_valence_mean`);
  with the recordings' `names`, also each one's values and frames (`recordings`), so that a
  report says what it covers."""
  dims = ("valence", "arousal")
  each = [{f"ccc_{name}": ccc(p[:, d], t[:, d]) for d, name in enumerate(dims)}
          for p, t in zip(preds, targets)]
  out: dict[str, Any] = {}
  for d, name in enumerate(dims):
    out[f"ccc_{name}"] = ccc(np.concatenate([p[:, d] for p in preds]),
                             np.concatenate([t[:, d] for t in targets]))
    out[f"ccc_{name}_mean"] = float(np.mean([e[f"ccc_{name}"] for e in each]))
  if names is not None:
    out["recordings"] = {n: {**e, "frames": len(p)} for n, e, p in zip(names, each, preds)}
  return out
