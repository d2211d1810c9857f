"""The paper's face network: FaceNet trunk -> DenseNet head -> (expression embedding, logits).

Schoneveld et al. 2021 cut a VGGFace2 FaceNet at mixed_7a and add a 1x1 projection, a DenseNet
block and a 1x1 reduction to a 128-d face feature; from that feature an L2-normalised FEC
embedding (triplet loss) and AffectNet expression logits are read out.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avemo_jax.models.layers import Conv
from avemo_jax.models.inception_resnet import BN_EPSILON, BN_MOMENTUM, InceptionResnetV1


def _bn(m: nn.Module, train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=m.dtype, axis_name=m.axis_name, name=name)


class DenseLayer(nn.Module):
  """DenseNet-BC layer: BN -> ReLU -> 1x1 conv (4*growth) -> BN -> ReLU -> 3x3 conv (growth)."""
  growth: int
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap axis: BatchNorm statistics over the global batch

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nn.relu(_bn(self, train, "bn_0")(x))
    y = Conv(4 * self.growth, (1, 1), use_bias=False, dtype=self.dtype, name="conv_0")(y)
    y = nn.relu(_bn(self, train, "bn_1")(y))
    return Conv(self.growth, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                   name="conv_1")(y)


class DenseBlock(nn.Module):
  """`num_layers` DenseLayers, each seeing the concatenation of the input and all earlier
  outputs: C -> C + num_layers * growth channels."""
  num_layers: int = 5
  growth: int = 64
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.num_layers):
      y = DenseLayer(self.growth, dtype=self.dtype, axis_name=self.axis_name,
                     name=f"layer_{i}")(x, train=train)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class FaceHead(nn.Module):
  """1x1 conv -> BN -> ReLU -> DenseBlock -> 1x1 conv -> BN -> ReLU -> global average pool."""
  proj_features: int = 512
  dense_layers: int = 5
  growth: int = 64
  feature_dim: int = 128
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x_BxhxwxC: jax.Array, *, train: bool) -> jax.Array:
    x = Conv(self.proj_features, (1, 1), use_bias=False, dtype=self.dtype,
                name="proj")(x_BxhxwxC)
    x = nn.relu(_bn(self, train, "proj_bn")(x))
    x = DenseBlock(self.dense_layers, self.growth, dtype=self.dtype, axis_name=self.axis_name,
                   name="dense")(x, train=train)
    x = Conv(self.feature_dim, (1, 1), use_bias=False, dtype=self.dtype, name="reduce")(x)
    x = nn.relu(_bn(self, train, "reduce_bn")(x))
    # Pool in float32: a bf16 mean over many positions loses precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / max(||x||, eps) along the last axis (finite gradient at x = 0)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class FaceNet(nn.Module):
  """Raw face pixels -> (expression logits, {"embedding", "feature"}).

  `cut`, `width`, `depth` configure the InceptionResnetV1 trunk; the head's widths are its own
  fields. `dtype` is the computation dtype (params and all outputs stay float32); `axis_name`
  makes BatchNorm average its batch statistics over that pmap axis.
  """
  cut: str = "mixed_7a"
  width: float = 1.0
  depth: tuple[int, int, int] = (5, 10, 5)
  proj_features: int = 512
  dense_layers: int = 5
  growth: int = 64
  feature_dim: int = 128
  embed_dim: int = 32
  num_classes: int = 8
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images_BxHxWx3: jax.Array, *,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    # facenet-pytorch's fixed_image_standardization; in float32 so uint8 input is exact.
    x = ((images_BxHxWx3.astype(jnp.float32) - 127.5) / 128.0).astype(self.dtype)
    x, _ = InceptionResnetV1(cut=self.cut, width=self.width, depth=self.depth, dtype=self.dtype,
                             axis_name=self.axis_name, name="trunk")(x, train=train)
    feature = FaceHead(self.proj_features, self.dense_layers, self.growth, self.feature_dim,
                       dtype=self.dtype, axis_name=self.axis_name, name="head")(x, train=train)
    # The read-outs are tiny; keep them in float32 for the losses.
    embedding = l2_normalize(nn.Dense(self.embed_dim, name="embedding")(feature))
    logits = nn.Dense(self.num_classes, name="logits")(feature)
    return logits, {"embedding": embedding, "feature": feature}
