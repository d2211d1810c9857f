"""Losses and metrics against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avemo_jax import losses, metrics


def test_cross_entropy_matches_numpy():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  labels = np.array([0, 1])
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = -np.log(p[np.arange(2), labels])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)


def test_triplet_loss_by_hand():
  # Faces on a line: 0 at x=0, 1 at x=1, 2 at x=3. Squared distances 1, 9, 4.
  emb = jnp.array([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]])
  # Odd one = 2: similar pair (0,1): d12=1, d13=9, d23=4 -> relu(1-9+.2)+relu(1-4+.2) = 0.
  np.testing.assert_allclose(losses.triplet_loss(emb, jnp.array([2]), jnp.array([0.2])), [0.0])
  # Odd one = 0: similar pair (1,2): d12=4, d(1,0)=1, d(2,0)=9 -> relu(4-1+.2)+relu(4-9+.2)=3.2.
  np.testing.assert_allclose(losses.triplet_loss(emb, jnp.array([0]), jnp.array([0.2])), [3.2],
                             rtol=1e-6)
  # Odd one = 1: pair (0,2): d=9, d(0,1)=1, d(2,1)=4 -> (9-1+.1)+(9-4+.1) = 13.2.
  np.testing.assert_allclose(losses.triplet_loss(emb, jnp.array([1]), jnp.array([0.1])), [13.2],
                             rtol=1e-6)
  np.testing.assert_array_equal(
      losses.triplet_correct(jnp.repeat(emb, 3, 0), jnp.array([2, 0, 1])), [True, False, False])


def test_distillation_kl_by_hand():
  s = np.array([[1.0, 2.0, 0.0]], np.float32)
  t = np.array([[2.0, 0.0, 1.0]], np.float32)
  temp = 2.0
  softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  ps, pt = softmax(s / temp), softmax(t / temp)
  expected = temp**2 * np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  np.testing.assert_allclose(losses.distillation_kl(s, t, temp), expected, rtol=1e-5)
  np.testing.assert_allclose(losses.distillation_kl(t, t, temp), [0.0], atol=1e-6)


def test_embedding_l2_and_combine():
  np.testing.assert_allclose(losses.embedding_l2(jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]])),
                             [5.0])
  total, logged = losses.combine({"a": jnp.array([1.0, 3.0]), "b": jnp.array([4.0]),
                                  "unused": jnp.array([9.0])}, {"a": 1.0, "b": 0.1})
  np.testing.assert_allclose(total, 2.0 + 0.4, rtol=1e-6)
  assert set(logged) == {"a", "b"}
  with pytest.raises(ValueError, match="typo"):
    losses.combine({"a": jnp.ones(1)}, {"typo": 1.0})


def test_confusion_accuracy_f1_by_hand():
  labels = np.array([0, 0, 1, 7, 7, 2, -1])
  pred = np.array([0, 1, 1, 7, 0, 2, 3])
  logits = jax.nn.one_hot(pred, 8) * 5.0
  # Contempt (7) second-best for the first row: 7-class drops it from predictions.
  logits = logits.at[3, 6].set(1.0)
  m = metrics.FaceMetrics.single_from_model_output(
      logits=logits, labels=labels, agreement=np.ones(7), mask=labels >= 0)
  out = metrics.summarize(m, None, with_agreement=True)
  assert out["acc8"] == pytest.approx(4 / 6)  # padded row (-1) ignored
  assert out["acc7"] == pytest.approx(3 / 4)  # rows with label 7 dropped
  # Per-class F1: c0 tp1 fp1 fn1 -> .5; c1 tp1 fp1 fn0 -> 2/3; c2 -> 1; c7 tp1 fp0 fn1 -> 2/3;
  # the other classes are neither in the labels nor predicted (sklearn's f1_score, "macro").
  assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1 + 2 / 3) / 4)
  # 7 classes: rows 0, 0, 1, 2 predicted 0, 1, 1, 2 -> c0 2/3, c1 2/3, c2 1.
  assert out["macro_f1_7"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
  assert out["test_faces_per_class"] == [2, 1, 1, 0, 0, 0, 0, 2]
  assert out["teacher_agreement"] == pytest.approx(1.0)
  assert np.sum(out["confusion"]) == 6
  # A 7-class model: no 8-class numbers, a 7x7 confusion matrix.
  seven = metrics.summarize(metrics.FaceMetrics.single_from_model_output(
      logits=logits[:, :7], labels=np.where(labels == 7, -1, labels), agreement=np.ones(7),
      mask=labels >= 0), None, with_agreement=False, num_classes=7)
  assert "acc8" not in seven and "macro_f1" not in seven and np.shape(seven["confusion"]) == (7, 7)
  assert seven["acc7"] == out["acc7"] and seven["macro_f1_7"] == out["macro_f1_7"]


def test_triplet_metric_by_type():
  emb = jnp.array([[[0.0], [1.0], [3.0]]] * 3)
  m = metrics.TripletMetrics.single_from_model_output(
      embeddings=emb, labels=jnp.array([2, 0, 2]), triplet_type=jnp.array([0, 1, -1]))
  correct, total = m.compute()["triplets"]
  np.testing.assert_array_equal(correct, [1, 0, 0])
  np.testing.assert_array_equal(total, [1, 1, 0])
  faces = metrics.FaceMetrics.single_from_model_output(
      logits=jnp.eye(8)[:2], labels=np.array([0, 1]), agreement=np.ones(2), mask=np.ones(2, bool))
  out = metrics.summarize(faces, m, with_agreement=False)
  assert out["fec_triplet_acc"] == 0.5 and out["fec_triplet_acc_one_class"] == 1.0
  # No three-class triplet in the test set: not measured (None), not 0% right.
  assert out["fec_triplet_acc_three_class"] is None and out["fec_triplets_three_class"] == 0
  assert [out[f"fec_triplets_{t}"] for t in metrics.TRIPLET_TYPE_NAMES] == [1, 1, 0]
