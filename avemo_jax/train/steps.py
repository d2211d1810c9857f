"""Pure train and eval steps. Bind the static arguments with functools.partial, then jit once.

A face step sees one batch {"faces": {"image" BxHxWx3, "label" B}, "triplets": {"images" Tx3xHxWx3,
"label" T, "triplet_type" T}[, "unlabelled": {"image" UxHxWx3}]}; all faces of the step go
through the network in one pass (so BatchNorm sees the whole step's faces, as in the paper's
shared trunk), and the outputs are split back per stream.
"""
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from avemo_jax import losses
from avemo_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def _images(batch: Mapping[str, Any]) -> tuple[jax.Array, int, int]:
  """All faces of a step as one batch, plus the labelled and triplet counts."""
  faces = batch["faces"]["image"]
  triplets = batch["triplets"]["images"]
  parts = [faces, triplets.reshape(-1, *triplets.shape[2:])]
  if "unlabelled" in batch:
    parts.append(batch["unlabelled"]["image"])
  return jnp.concatenate(parts), faces.shape[0], triplets.shape[0]


def _supervised_terms(logits, embedding, batch, num_faces: int, num_triplets: int,
                      margins: tuple[float, float, float]) -> dict[str, jax.Array]:
  """Ground-truth terms: CE on the labelled faces, triplet loss on the FEC triplets."""
  trip = batch["triplets"]
  emb_Tx3xD = embedding[num_faces:num_faces + 3 * num_triplets].reshape(num_triplets, 3, -1)
  margin_T = jnp.asarray(margins)[trip["triplet_type"]]
  return {
      "ce": losses.cross_entropy(logits[:num_faces], batch["faces"]["label"]),
      "triplet": losses.triplet_loss(emb_Tx3xD, trip["label"], margin_T),
  }


def _train_metrics(logits, embedding, batch, num_faces: int, num_triplets: int) -> Metrics:
  emb_Tx3xD = embedding[num_faces:num_faces + 3 * num_triplets].reshape(num_triplets, 3, -1)
  return {
      "train_acc": jnp.mean(jnp.argmax(logits[:num_faces], -1) == batch["faces"]["label"]),
      "train_triplet_acc": jnp.mean(losses.triplet_correct(emb_Tx3xD, batch["triplets"]["label"])),
  }


def _apply_gradients(state: TrainState, loss_fn: Callable) -> tuple[TrainState, Metrics]:
  """Differentiates loss_fn(params) -> (loss, (batch_stats, metrics)) and updates the state."""
  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(state.params)}
  return state, metrics


def teacher_step(state: TrainState, batch: Mapping[str, Any], *, weights: Mapping[str, float],
                 margins: tuple[float, float, float]) -> tuple[TrainState, Metrics]:
  """L = sum_k w_k L_k over {"triplet", "ce"} (the paper: triplet + 0.1 CE)."""
  images, nf, nt = _images(batch)

  def loss_fn(params):
    (logits, aux), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    terms = _supervised_terms(logits, aux["embedding"], batch, nf, nt, margins)
    total, logged = losses.combine(terms, weights)
    return total, (updates["batch_stats"],
                   {**logged, **_train_metrics(logits, aux["embedding"], batch, nf, nt)})

  return _apply_gradients(state, loss_fn)


def distill_loss(params, batch_stats, teacher_variables, batch: Mapping[str, Any], *, apply_fn,
                 weights: Mapping[str, float], margins: tuple[float, float, float],
                 temperature: float):
  """Student loss against the frozen teacher (eval mode, no gradient) and the ground truth.

  Terms: "kl" (T^2-scaled KL of softened logits) and "embed" (squared L2 of the FEC embeddings)
  over every face of the step, labelled, triplet and unlabelled; "ce" and "triplet" on the
  labelled streams. Returns (total, (new batch_stats, metrics)).
  """
  images, nf, nt = _images(batch)
  teacher_logits, teacher_aux = apply_fn(jax.lax.stop_gradient(teacher_variables), images,
                                         train=False)
  (logits, aux), updates = apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
  terms = _supervised_terms(logits, aux["embedding"], batch, nf, nt, margins)
  terms["kl"] = losses.distillation_kl(logits, teacher_logits, temperature)
  terms["embed"] = losses.embedding_l2(aux["embedding"], teacher_aux["embedding"])
  total, logged = losses.combine(terms, weights)
  agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
  metrics = {**logged, **_train_metrics(logits, aux["embedding"], batch, nf, nt),
             "train_teacher_agreement": agreement}
  return total, (updates["batch_stats"], metrics)


def distill_step(state: TrainState, teacher_variables, batch: Mapping[str, Any], *,
                 weights: Mapping[str, float], margins: tuple[float, float, float],
                 temperature: float) -> tuple[TrainState, Metrics]:
  """One student update; the teacher's variables are an argument, never differentiated."""
  loss_fn = lambda params: distill_loss(
      params, state.batch_stats, teacher_variables, batch, apply_fn=state.apply_fn,
      weights=weights, margins=margins, temperature=temperature)
  return _apply_gradients(state, loss_fn)


def _regression_update(state: TrainState, forward: Callable, target_Nx2: jax.Array,
                       mask_N: jax.Array, weights: Mapping[str, float]):
  """Valence/arousal regression on the valid frames: terms "ccc" (1 - CCC per dimension, over
  the whole batch) and "mse"; the per-dimension CCCs are logged too."""
  def loss_fn(params):
    pred_Nx2 = forward(params)
    ccc_2 = losses.ccc(pred_Nx2.T, target_Nx2.T, mask_N)
    mask = mask_N.astype(pred_Nx2.dtype)[:, None]
    mse = jnp.sum(mask * jnp.square(pred_Nx2 - target_Nx2), 0) / jnp.maximum(jnp.sum(mask), 1.0)
    total, logged = losses.combine({"ccc": 1.0 - ccc_2, "mse": mse}, weights)
    return total, (state.batch_stats, {**logged, "train_ccc_valence": ccc_2[0],
                                       "train_ccc_arousal": ccc_2[1]})

  return _apply_gradients(state, loss_fn)


def audio_step(state: TrainState, batch: Mapping[str, Any], *,
               weights: Mapping[str, float]) -> tuple[TrainState, Metrics]:
  """Audio encoder on {"mel" Bx96x64, "labels" Bx2}: clip-level valence/arousal regression."""
  forward = lambda params: state.apply_fn({"params": params}, batch["mel"], train=True)[0]
  mask = jnp.ones(batch["labels"].shape[0], bool)
  return _regression_update(state, forward, batch["labels"], mask, weights)


def fusion_step(state: TrainState, batch: Mapping[str, Any], *, weights: Mapping[str, float],
                seed: int) -> tuple[TrainState, Metrics]:
  """Fusion GRU on {"visual"/"audio" BxTxD, "lengths" B, "labels" BxTx2}; padded frames
  (t >= length) are left out of the loss. Dropout's key is the seed folded with the step."""
  b, t = batch["labels"].shape[:2]
  mask_N = (jnp.arange(t)[None, :] < batch["lengths"][:, None]).reshape(-1)
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def forward(params):
    pred, _ = state.apply_fn({"params": params}, batch, batch["lengths"], train=True,
                             rngs={"dropout": rng})
    return pred.reshape(b * t, 2)

  return _regression_update(state, forward, batch["labels"].reshape(b * t, 2), mask_N, weights)


def predict(variables, images: jax.Array, *, apply_fn) -> tuple[jax.Array, jax.Array]:
  """Eval-mode logits and FEC embeddings."""
  logits, aux = apply_fn(variables, images, train=False)
  return logits, aux["embedding"]
