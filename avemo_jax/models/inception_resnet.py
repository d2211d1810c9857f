"""FaceNet Inception-ResNet-v1 trunk, layer for layer as facenet-pytorch 2.6 `InceptionResnetV1`.

Layout is NHWC; the heads of the torch model (avgpool, last_linear, last_bn, logits) are not
included. Names follow the torch state dict so that a converter is a string rewrite:

  torch                                   flax (params / batch_stats)
  conv2d_1a.conv.weight  (O,I,kh,kw)      params/conv2d_1a/conv/kernel  (kh,kw,I,O)
  conv2d_1a.bn.weight / .bias             params/conv2d_1a/bn/scale / bias
  conv2d_1a.bn.running_mean / _var        batch_stats/conv2d_1a/bn/mean / var
  repeat_1.3.branch1.0.conv.weight        params/repeat_1/block_3/branch1_0/conv/kernel
  repeat_1.3.branch0.conv.weight          params/repeat_1/block_3/branch0/conv/kernel
  repeat_1.3.conv2d.weight / .bias        params/repeat_1/block_3/conv2d/kernel / bias
  mixed_6a.branch1.2.conv.weight          params/mixed_6a/branch1_2/conv/kernel
  block8.conv2d.weight                    params/block8/conv2d/kernel

i.e. `repeat_k.N.` -> `repeat_k/block_N/`, `branchK.N.` -> `branchK_N/`, other `.` -> `/`,
`weight` -> `kernel` (convs, transposed (2,3,1,0)) or `scale` (BN). Max-pool branches
(`mixed_6a.branch2`, `mixed_7a.branch3`, `maxpool_3a`) have no parameters.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from avemo_jax.models.layers import Conv, max_pool

# facenet-pytorch BatchNorm2d(eps=0.001, momentum=0.1); Flax's momentum is 1 - torch's.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3

CUTS = ("mixed_7a", "block8")
MIN_INPUT_SIZE = 75  # smallest side for which mixed_7a still has a 1x1 output

Padding = int | tuple[int, int]


def _pad(p: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """Torch-style symmetric padding (int or (ph, pw)) in Flax's ((lo, hi), (lo, hi)) form."""
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


def _max_pool(x: jax.Array) -> jax.Array:
  """torch MaxPool2d(3, stride=2): no padding, floor mode."""
  return max_pool(x, (3, 3), (2, 2))


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: Padding = 0
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap axis: BatchNorm statistics over the global batch

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = Conv(self.features, self.kernel, strides=self.strides, padding=_pad(self.padding),
                use_bias=False, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, axis_name=self.axis_name, name="bn")(x)
    return nn.relu(x)


def scaled_channels(c: int, width: float) -> int:
  """`c * width` rounded to a multiple of 8, at least 8 (exactly `c` for width 1)."""
  return max(8, round(c * width / 8) * 8)


# A branch is a chain of BasicConv2d specs (features, kernel[, strides[, padding]]).
Branches = tuple[tuple[str, tuple[tuple, ...]], ...]


class _Branchy(nn.Module):
  """Inception block: parallel conv chains (`BRANCHES`), channel counts scaled by `width`."""
  BRANCHES: ClassVar[Branches] = ()
  width: float = 1.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  def branches(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    """Outputs of every branch; chain members are named `{branch}_{i}` like torch's
    `Sequential` children, a single conv just `{branch}` (as in torch)."""
    outs = []
    for name, specs in self.BRANCHES:
      y = x
      for i, (features, *rest) in enumerate(specs):
        sub = name if len(specs) == 1 else f"{name}_{i}"
        y = BasicConv2d(scaled_channels(features, self.width), *rest, dtype=self.dtype,
                        axis_name=self.axis_name, name=sub)(y, train=train)
      outs.append(y)
    return outs


class _Residual(_Branchy):
  """Block35/17/8: branches -> concat -> 1x1 conv (with bias) back to the input width,
  out = x + scale * up, then ReLU (unless `relu=False`)."""
  scale: float = 1.0
  relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    up = jnp.concatenate(self.branches(x, train=train), axis=-1)
    up = Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="conv2d")(up)
    x = x + self.scale * up
    return nn.relu(x) if self.relu else x


class Block35(_Residual):
  BRANCHES = (
      ("branch0", ((32, (1, 1)),)),
      ("branch1", ((32, (1, 1)), (32, (3, 3), 1, 1))),
      ("branch2", ((32, (1, 1)), (32, (3, 3), 1, 1), (32, (3, 3), 1, 1))),
  )


class Block17(_Residual):
  BRANCHES = (
      ("branch0", ((128, (1, 1)),)),
      ("branch1", ((128, (1, 1)), (128, (1, 7), 1, (0, 3)), (128, (7, 1), 1, (3, 0)))),
  )


class Block8(_Residual):
  BRANCHES = (
      ("branch0", ((192, (1, 1)),)),
      ("branch1", ((192, (1, 1)), (192, (1, 3), 1, (0, 1)), (192, (3, 1), 1, (1, 0)))),
  )


class _Reduction(_Branchy):
  """Mixed_6a/7a: conv branches plus a parameter-free max-pool branch (the last in torch)."""

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return jnp.concatenate(self.branches(x, train=train) + [_max_pool(x)], axis=-1)


class Mixed6a(_Reduction):
  BRANCHES = (
      ("branch0", ((384, (3, 3), 2),)),
      ("branch1", ((192, (1, 1)), (192, (3, 3), 1, 1), (256, (3, 3), 2))),
  )


class Mixed7a(_Reduction):
  BRANCHES = (
      ("branch0", ((256, (1, 1)), (384, (3, 3), 2))),
      ("branch1", ((256, (1, 1)), (256, (3, 3), 2))),
      ("branch2", ((256, (1, 1)), (256, (3, 3), 1, 1), (256, (3, 3), 2))),
  )


class Repeat(nn.Module):
  """`num` copies of a residual block (torch `Sequential`), named `block_0`, `block_1`, ..."""
  block: type[_Residual]
  num: int
  scale: float
  width: float = 1.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.num):
      x = self.block(scale=self.scale, width=self.width, dtype=self.dtype,
                     axis_name=self.axis_name, name=f"block_{i}")(x, train=train)
    return x


class InceptionResnetV1(nn.Module):
  """The convolutional trunk of FaceNet, up to `cut` ("mixed_7a": 1792 channels, 3x3 at
  140x140 or 160x160; "block8": also repeat_3 and the final un-ReLU'd Block8).

  Input: faces already standardised as (pixel - 127.5) / 128. `width` scales all channel
  counts and `depth` sets the blocks in repeat_1/2/3, for small test variants.
  """
  cut: str = "mixed_7a"
  width: float = 1.0
  depth: tuple[int, int, int] = (5, 10, 5)
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x_BxHxWx3: jax.Array, *,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    if self.cut not in CUTS:
      raise ValueError(f"cut must be one of {CUTS}, got {self.cut!r}")
    if min(x_BxHxWx3.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"input must be at least {MIN_INPUT_SIZE}px, got {x_BxHxWx3.shape}")
    conv = lambda name, c, *rest: BasicConv2d(scaled_channels(c, self.width), *rest,
                                              dtype=self.dtype, axis_name=self.axis_name,
                                              name=name)
    kw = dict(width=self.width, dtype=self.dtype, axis_name=self.axis_name)
    aux = {}

    x = x_BxHxWx3.astype(self.dtype)
    x = conv("conv2d_1a", 32, (3, 3), 2)(x, train=train)
    x = conv("conv2d_2a", 32, (3, 3))(x, train=train)
    x = conv("conv2d_2b", 64, (3, 3), 1, 1)(x, train=train)
    x = _max_pool(x)  # maxpool_3a
    x = conv("conv2d_3b", 80, (1, 1))(x, train=train)
    x = conv("conv2d_4a", 192, (3, 3))(x, train=train)
    x = aux["conv2d_4b"] = conv("conv2d_4b", 256, (3, 3), 2)(x, train=train)
    x = aux["repeat_1"] = Repeat(Block35, self.depth[0], 0.17, **kw, name="repeat_1")(
        x, train=train)
    x = aux["mixed_6a"] = Mixed6a(**kw, name="mixed_6a")(x, train=train)
    x = aux["repeat_2"] = Repeat(Block17, self.depth[1], 0.10, **kw, name="repeat_2")(
        x, train=train)
    x = aux["mixed_7a"] = Mixed7a(**kw, name="mixed_7a")(x, train=train)
    if self.cut == "block8":
      x = aux["repeat_3"] = Repeat(Block8, self.depth[2], 0.20, **kw, name="repeat_3")(
          x, train=train)
      x = aux["block8"] = Block8(scale=1.0, relu=False, **kw, name="block8")(x, train=train)
    return x, aux
