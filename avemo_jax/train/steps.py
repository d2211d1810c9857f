"""Pure train and eval steps. Bind the static arguments with functools.partial, then jit once.

A face step sees one batch {"faces": {"image" BxHxWx3, "label" B}, "triplets": {"images" Tx3xHxWx3,
"label" T, "triplet_type" T}[, "unlabelled": {"image" UxHxWx3}]}; all faces of the step go
through the network in one pass (so BatchNorm sees the whole step's faces, as in the paper's
shared trunk), and the outputs are split back per stream.

Under `jax.jit` a step sees the global batch. Under `jax.pmap` (`axis_name` set) it sees one
device's share: outputs and labels are gathered over the axis before the losses, so every loss
(CCC included) is the global-batch one, and the gradients are averaged over the axis.
"""
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from avemo_jax import losses
from avemo_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def _gather(tree: Any, axis_name: str | None) -> Any:
  """The global batch of per-device values (pmap); the values themselves under jit."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def _images(batch: Mapping[str, Any]) -> jax.Array:
  """All faces of a step as one batch: labelled, then triplets, then unlabelled."""
  triplets = batch["triplets"]["images"]
  parts = [batch["faces"]["image"], triplets.reshape(-1, *triplets.shape[2:])]
  if "unlabelled" in batch:
    parts.append(batch["unlabelled"]["image"])
  return jnp.concatenate(parts)


def _per_stream(outputs: Any, batch: Mapping[str, Any], axis_name: str | None
                ) -> dict[str, Any]:
  """Splits the outputs of `_images(batch)` back into streams ("triplets" as T x 3 x ...),
  gathered over `axis_name` (with the labels) into global-batch streams."""
  nf, nt = batch["faces"]["image"].shape[0], batch["triplets"]["images"].shape[0]
  split = lambda x: {"faces": x[:nf], "triplets": x[nf:nf + 3 * nt].reshape(nt, 3, *x.shape[1:]),
                     "all": x}
  labels = {"faces": batch["faces"]["label"], "triplet_label": batch["triplets"]["label"],
            "triplet_type": batch["triplets"]["triplet_type"]}
  return _gather({"outputs": jax.tree.map(split, outputs), "labels": labels}, axis_name)


def _supervised_terms(logits, embedding, labels, margins: tuple[float, float, float]
                      ) -> dict[str, jax.Array]:
  """Ground-truth terms: CE on the labelled faces, triplet loss on the FEC triplets."""
  margin_T = jnp.asarray(margins)[labels["triplet_type"]]
  return {
      "ce": losses.cross_entropy(logits["faces"], labels["faces"]),
      "triplet": losses.triplet_loss(embedding["triplets"], labels["triplet_label"], margin_T),
  }


def _train_metrics(logits, embedding, labels) -> Metrics:
  return {
      "train_acc": jnp.mean(jnp.argmax(logits["faces"], -1) == labels["faces"]),
      "train_triplet_acc": jnp.mean(losses.triplet_correct(embedding["triplets"],
                                                           labels["triplet_label"])),
  }


def _apply_gradients(state: TrainState, loss_fn: Callable, axis_name: str | None = None
                     ) -> tuple[TrainState, Metrics]:
  """Differentiates loss_fn(params) -> (loss, (batch_stats, metrics)) and updates the state."""
  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  # A non-finite step leaves everything as it was (params, BatchNorm statistics, optimizer and
  # step count); the loop stops or counts it (config on_nonfinite). A finite loss and gradient
  # norm imply a finite AdamW update (from finite parameters), so the flag is known before the
  # update and chooses whether to run it: with `jnp.where(finite, new, old)` over the state
  # instead, XLA copied every donated moment and parameter first (the old values are read after
  # the new ones overwrite them): 881 copies in the face train step, whose executable then
  # loaded 1.1-1.3 s slower from the compilation cache (2 Xeon cores).
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  state = jax.lax.cond(finite, lambda s: s.apply_gradients(grads=grads, batch_stats=batch_stats),
                       lambda s: s, state)
  # The parameters' norm is the loop's, at log time (`loop.param_norm`), not every step's.
  metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  return state, metrics


def teacher_step(state: TrainState, batch: Mapping[str, Any], *, weights: Mapping[str, float],
                 margins: tuple[float, float, float], axis_name: str | None = None
                 ) -> tuple[TrainState, Metrics]:
  """L = sum_k w_k L_k over {"triplet", "ce"} (the paper: triplet + 0.1 CE)."""
  def loss_fn(params):
    (logits, aux), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, _images(batch), train=True,
        mutable=["batch_stats"])
    g = _per_stream({"logits": logits, "embedding": aux["embedding"]}, batch, axis_name)
    logits, embedding, labels = g["outputs"]["logits"], g["outputs"]["embedding"], g["labels"]
    total, logged = losses.combine(_supervised_terms(logits, embedding, labels, margins), weights)
    return total, (updates["batch_stats"],
                   {**logged, **_train_metrics(logits, embedding, labels)})

  return _apply_gradients(state, loss_fn, axis_name)


def distill_loss(params, batch_stats, teacher_variables, batch: Mapping[str, Any], *, apply_fn,
                 weights: Mapping[str, float], margins: tuple[float, float, float],
                 temperature: float, axis_name: str | None = None):
  """Student loss against the frozen teacher (eval mode, no gradient) and the ground truth.

  Terms: "kl" (T^2-scaled KL of softened logits) and "embed" (squared L2 of the FEC embeddings)
  over every face of the step, labelled, triplet and unlabelled; "ce" and "triplet" on the
  labelled streams. Returns (total, (new batch_stats, metrics)).
  """
  images = _images(batch)
  teacher_logits, teacher_aux = apply_fn(jax.lax.stop_gradient(teacher_variables), images,
                                         train=False)
  (logits, aux), updates = apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
  g = _per_stream({"logits": logits, "embedding": aux["embedding"], "teacher_logits":
                   teacher_logits, "teacher_embedding": teacher_aux["embedding"]}, batch, axis_name)
  out, labels = g["outputs"], g["labels"]
  terms = _supervised_terms(out["logits"], out["embedding"], labels, margins)
  terms["kl"] = losses.distillation_kl(out["logits"]["all"], out["teacher_logits"]["all"],
                                       temperature)
  terms["embed"] = losses.embedding_l2(out["embedding"]["all"], out["teacher_embedding"]["all"])
  total, logged = losses.combine(terms, weights)
  agreement = jnp.mean(jnp.argmax(out["logits"]["all"], -1)
                       == jnp.argmax(out["teacher_logits"]["all"], -1))
  metrics = {**logged, **_train_metrics(out["logits"], out["embedding"], labels),
             "train_teacher_agreement": agreement}
  return total, (updates["batch_stats"], metrics)


def distill_step(state: TrainState, teacher_variables, batch: Mapping[str, Any], *,
                 weights: Mapping[str, float], margins: tuple[float, float, float],
                 temperature: float, axis_name: str | None = None
                 ) -> tuple[TrainState, Metrics]:
  """One student update; the teacher's variables are an argument, never differentiated."""
  loss_fn = lambda params: distill_loss(
      params, state.batch_stats, teacher_variables, batch, apply_fn=state.apply_fn,
      weights=weights, margins=margins, temperature=temperature, axis_name=axis_name)
  return _apply_gradients(state, loss_fn, axis_name)


def _regression_update(state: TrainState, forward: Callable, target_Nx2: jax.Array,
                       mask_N: jax.Array, weights: Mapping[str, float], axis_name: str | None):
  """Valence/arousal regression on the valid frames: terms "ccc" (1 - CCC per dimension, over
  the whole batch) and "mse"; the per-dimension CCCs are logged too."""
  def loss_fn(params):
    pred_Nx2, target, valid = _gather((forward(params), target_Nx2, mask_N), axis_name)
    ccc_2 = losses.ccc(pred_Nx2.T, target.T, valid)
    mask = valid.astype(pred_Nx2.dtype)[:, None]
    mse = jnp.sum(mask * jnp.square(pred_Nx2 - target), 0) / jnp.maximum(jnp.sum(mask), 1.0)
    total, logged = losses.combine({"ccc": 1.0 - ccc_2, "mse": mse}, weights)
    return total, (state.batch_stats, {**logged, "train_ccc_valence": ccc_2[0],
                                       "train_ccc_arousal": ccc_2[1]})

  return _apply_gradients(state, loss_fn, axis_name)


def audio_step(state: TrainState, batch: Mapping[str, Any], *, weights: Mapping[str, float],
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """Audio encoder on {"mel" Bx96x64, "labels" Bx2}: clip-level valence/arousal regression."""
  forward = lambda params: state.apply_fn({"params": params}, batch["mel"], train=True)[0]
  mask = jnp.ones(batch["labels"].shape[0], bool)
  return _regression_update(state, forward, batch["labels"], mask, weights, axis_name)


def windows(table: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], frames: int
            ) -> dict[str, jax.Array]:
  """The `frames`-long windows of whole recordings that a fusion step trains on, cut on the
  device: `table` holds one [R, T, D] array per modality, "labels" [R, T, 2] and "lengths" [R];
  `batch` the "recording" and "start" [B] of each window. Returns {"<modality>"/"labels" BxFxD,
  "lengths" B}, zero from a recording's end on (and its "lengths" entry saying where that is)."""
  lengths = jnp.minimum(table["lengths"][batch["recording"]], frames)
  valid = jnp.arange(frames)[None, :, None] < lengths[:, None, None]

  def cut(x: jax.Array) -> jax.Array:
    n = min(frames, x.shape[1])  # every recording may be shorter than a window: pad the windows
    one = lambda r, start: jax.lax.dynamic_slice_in_dim(x[r], start, n)
    w = jnp.pad(jax.vmap(one)(batch["recording"], batch["start"]),
                [(0, 0), (0, frames - n)] + [(0, 0)] * (x.ndim - 2))
    return jnp.where(valid, w, 0)

  return {**{k: cut(v) for k, v in table.items() if k != "lengths"}, "lengths": lengths}


def fusion_step(state: TrainState, table: Mapping[str, jax.Array], batch: Mapping[str, Any], *,
                frames: int, weights: Mapping[str, float], seed: int,
                axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """Fusion GRU on the windows `batch` picks from the recordings in `table` (`windows`); padded
  frames (t >= length) are left out of the loss. Dropout's key is the seed folded with the step
  (under pmap each device draws its own masks: statistically, not bitwise, the jit run's)."""
  batch = windows(table, batch, frames)
  b, t = batch["labels"].shape[:2]
  mask_N = (jnp.arange(t)[None, :] < batch["lengths"][:, None]).reshape(-1)
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def forward(params):
    pred, _ = state.apply_fn({"params": params}, batch, batch["lengths"], train=True,
                             rngs={"dropout": rng})
    return pred.reshape(b * t, 2)

  return _regression_update(state, forward, batch["labels"].reshape(b * t, 2), mask_N, weights,
                            axis_name)


def predict(variables, images: jax.Array, *, apply_fn) -> tuple[jax.Array, jax.Array]:
  """Eval-mode logits and FEC embeddings."""
  logits, aux = apply_fn(variables, images, train=False)
  return logits, aux["embedding"]
