"""Pure loss functions (per-example values) and the weighted composition of named terms."""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Softmax cross entropy with integer labels, per example."""
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)


def triplet_distances(emb_Bx3xD: jax.Array, labels_B: jax.Array):
  """Squared distances (similar pair, odd-to-first, odd-to-second) of FEC triplets.

  `labels_B` names the face (0, 1 or 2) most different from the other two.
  """
  odd = jax.nn.one_hot(labels_B, 3, dtype=emb_Bx3xD.dtype)
  e_odd = jnp.einsum("bk,bkd->bd", odd, emb_Bx3xD)
  # The two similar faces, in their original order: (0,1) if 2 is odd, (0,2) if 1, (1,2) if 0.
  first = jnp.where(labels_B == 0, 1, 0)
  second = jnp.where(labels_B == 2, 1, 2)
  take = lambda i: jnp.take_along_axis(emb_Bx3xD, i[:, None, None], axis=1)[:, 0]
  e1, e2 = take(first), take(second)
  sq = lambda a, b: jnp.sum(jnp.square(a - b), axis=-1)
  return sq(e1, e2), sq(e1, e_odd), sq(e2, e_odd)


def triplet_loss(emb_Bx3xD: jax.Array, labels_B: jax.Array, margins_B: jax.Array) -> jax.Array:
  """FEC triplet loss (Vemulapalli & Agarwala 2019), per triplet:

  max(0, d(e1, e2) - d(e1, e3) + m) + max(0, d(e1, e2) - d(e2, e3) + m), squared L2 distances,
  e1/e2 the similar pair and e3 the odd face.
  """
  d12, d13, d23 = triplet_distances(emb_Bx3xD, labels_B)
  return jax.nn.relu(d12 - d13 + margins_B) + jax.nn.relu(d12 - d23 + margins_B)


def triplet_correct(emb_Bx3xD: jax.Array, labels_B: jax.Array) -> jax.Array:
  """1 where the similar pair is closer than both distances to the odd face."""
  d12, d13, d23 = triplet_distances(emb_Bx3xD, labels_B)
  return (d12 < d13) & (d12 < d23)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                    temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), per example (Hinton et al. 2015)."""
  targets = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  log_preds = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return temperature**2 * optax.losses.kl_divergence(log_preds, targets)


def embedding_l2(student_emb: jax.Array, teacher_emb: jax.Array) -> jax.Array:
  """Squared L2 distance between student and teacher embeddings, per example."""
  return jnp.sum(optax.losses.squared_error(student_emb, teacher_emb), axis=-1)


def combine(terms: Mapping[str, jax.Array], weights: Mapping[str, float]):
  """Weighted sum of the mean of each named term; returns (total, {name: mean})."""
  unknown = set(weights) - set(terms)
  if unknown:
    raise ValueError(f"loss weights name unknown terms {sorted(unknown)}; known: {sorted(terms)}")
  means = {name: jnp.mean(value) for name, value in terms.items() if name in weights}
  total = sum(weights[name] * value for name, value in means.items())
  return total, means


def ccc(pred_N: jax.Array, target_N: jax.Array, mask_N: jax.Array | None = None) -> jax.Array:
  """Concordance correlation coefficient over the last axis (masked, population moments).

  2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2); differentiable, so 1 - CCC is a loss.
  `mask_N` (0/1) leaves padded frames out; leading axes are batched (e.g. [2, N] for valence and
  arousal).
  """
  w = jnp.ones_like(pred_N) if mask_N is None else jnp.broadcast_to(mask_N, pred_N.shape)
  w = w.astype(pred_N.dtype)
  n = jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)
  mx = jnp.sum(w * pred_N, axis=-1, keepdims=True) / n
  my = jnp.sum(w * target_N, axis=-1, keepdims=True) / n
  dx, dy = pred_N - mx, target_N - my
  var_x = jnp.sum(w * dx * dx, axis=-1) / n[..., 0]
  var_y = jnp.sum(w * dy * dy, axis=-1) / n[..., 0]
  cov = jnp.sum(w * dx * dy, axis=-1) / n[..., 0]
  return 2 * cov / (var_x + var_y + jnp.square(mx - my)[..., 0] + 1e-8)
