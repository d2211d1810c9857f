"""VGGish (Hershey et al. 2017): a VGG-style CNN on 96x64 log-mel patches -> 128-d embedding.

Layout and names follow the AudioSet release (conv1, conv2, conv3/conv3_1, ...; here flattened
to `conv3_1`), so pretrained weights map one to one: conv64-pool-conv128-pool-conv256x2-pool-
conv512x2-pool, fc4096-fc4096-fc128, no BatchNorm, ReLU after every layer but the embedding's,
where it is a choice (`embedding_relu`): the first AudioSet release and torchvggish have it, the
current AudioSet code (`activation_fn=None`: "the pre-activation values") does not. The flatten is
NHWC (the TF order, which torchvggish reproduces by transposing). A linear valence/arousal head
on the embedding is the clip-level regression target of the audio stage. The embedding and the
head are computed in float32 whatever `dtype` (read-outs for the losses and for fusion).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avemo_jax.models.layers import Conv, max_pool

NUM_FRAMES, NUM_BANDS = 96, 64  # one example: 0.96 s of 10 ms log-mel frames x 64 mel bands
# (block name, convs, channels) of the full model.
BLOCKS = (("conv1", 1, 64), ("conv2", 1, 128), ("conv3", 2, 256), ("conv4", 2, 512))


class VGGish(nn.Module):
  """log-mel [B, 96, 64] -> (valence/arousal [B, 2], {"embedding": [B, embed_dim]}).

  `width` scales the conv channels and `fc_dim` the two hidden fully connected layers (1.0 and
  4096 is VGGish: 72,141,184 parameters without the valence/arousal head).
  """
  width: float = 1.0
  fc_dim: int = 4096
  embed_dim: int = 128
  embedding_relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, mel_BxTxF: jax.Array, *, train: bool = False):
    del train  # no dropout or BatchNorm in VGGish; the keyword keeps the model interface uniform
    if mel_BxTxF.shape[1:] != (NUM_FRAMES, NUM_BANDS):
      raise ValueError(f"VGGish expects log-mel examples [B, {NUM_FRAMES}, {NUM_BANDS}], got "
                       f"{mel_BxTxF.shape}; see avemo_jax.data.audio_features")
    x = mel_BxTxF.astype(self.dtype)[..., None]
    for block, convs, channels in BLOCKS:
      for i in range(convs):
        name = block if convs == 1 else f"{block}_{i + 1}"
        x = nn.relu(Conv(max(1, round(channels * self.width)), (3, 3), padding="SAME",
                         dtype=self.dtype, name=name)(x))
      x = max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)  # NHWC flatten: [B, 6 * 4 * C]
    x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, name="fc1_1")(x))
    x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, name="fc1_2")(x))
    embedding = nn.Dense(self.embed_dim, name="fc2")(x.astype(jnp.float32))
    embedding = nn.relu(embedding) if self.embedding_relu else embedding
    return nn.Dense(2, name="va_head")(embedding), {"embedding": embedding}
