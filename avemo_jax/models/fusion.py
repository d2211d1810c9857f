"""Audio-visual fusion (DESIGN.md §1.5): per 40 ms frame, the face feature and the audio
embedding are fused and GRUs over time (`lax.scan` through Flax `nn.RNN`) feed a linear
valence/arousal head. Visual-only and audio-only models are the same module with one modality
left out.
"""
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MODALITIES = ("visual", "audio")


class FusionGRU(nn.Module):
  """{modality: [B, T, D_m]}, lengths [B] -> (valence/arousal [B, T, 2], {"hidden": [B, T, H]}).

  level "model" (default): each modality runs through its own GRU; their per-frame states are
  concatenated and feed `num_layers` more GRU layers (0: straight to the head). With one
  modality this is exactly a single-modality GRU model. level "feature": the features are
  concatenated and feed `num_layers` (>= 1) GRU layers. Measured on the synthetic recordings
  (README): the feature-level GRU fits the training people through whichever modality is easier
  and trails audio alone on arousal; model level beats both single modalities on both dimensions.

  Features are expected standardised per dimension (the frozen extractors' features live on
  different scales; `avemo_jax.train.features.standardize` does it with training-set statistics:
  a per-frame LayerNorm would erase the feature magnitude, which carries intensity). Frames at
  t >= length are padding: the GRU runs forward in time, so outputs at t < length never depend
  on them; outputs at t >= length are meaningless and callers mask them out.
  """
  modalities: Sequence[str] = MODALITIES
  hidden: int = 128
  num_layers: int = 0
  dropout: float = 0.1
  modality_dropout: float = 0.0  # training: P(a modality is zeroed for a whole sequence)
  level: str = "model"

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], lengths_B: jax.Array, *,
               train: bool = False):
    unknown = set(self.modalities) - set(MODALITIES)
    if unknown or not self.modalities:
      raise ValueError(f"modalities={tuple(self.modalities)}: choose one or more of {MODALITIES}")
    missing = set(self.modalities) - set(features)
    if missing:
      raise ValueError(f"features lack {sorted(missing)}; got {sorted(features)}")
    if self.level not in ("feature", "model") or (self.level == "feature" and self.num_layers < 1):
      raise ValueError(f"level={self.level!r}, num_layers={self.num_layers}: choose level 'model' "
                       "(num_layers >= 0) or 'feature' (num_layers >= 1)")
    gru = lambda x, name: nn.RNN(nn.GRUCell(self.hidden, name=f"gru_{name}"), name=f"rnn_{name}")(
        x, seq_lengths=lengths_B)
    inputs = [nn.Dropout(self.dropout, deterministic=not train)(features[m].astype(jnp.float32))
              for m in self.modalities]
    if self.level == "model":
      inputs = [gru(x, m) for m, x in zip(self.modalities, inputs)]
    if train and self.modality_dropout and len(inputs) > 1:
      # ModDrop (Neverova et al. 2016): the model must use each modality on its own as well,
      # instead of fitting the training people through whichever is easier. Never all at once.
      keep_BxM = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.modality_dropout,
                                      (inputs[0].shape[0], len(inputs)))
      keep_BxM |= ~keep_BxM.any(axis=1, keepdims=True)
      inputs = [x * keep_BxM[:, i, None, None] for i, x in enumerate(inputs)]
    x = jnp.concatenate(inputs, axis=-1)
    for i in range(self.num_layers):
      x = gru(x, i)
    return nn.Dense(2, name="va_head")(x), {"hidden": x}
