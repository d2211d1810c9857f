"""Shapes, parameter counts and BatchNorm behaviour of the trunk and the face network.

Full-size models are only traced (jax.eval_shape); real forward passes use a tiny variant.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avemo_jax.models.face import FaceNet
from avemo_jax.models.inception_resnet import InceptionResnetV1
from avemo_jax.train import build

TINY = dict(width=0.25, depth=(1, 1, 1), proj_features=32, dense_layers=2, growth=8,
            feature_dim=16)


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_init(model, shape):
  """(output, variables) of `model.init_with_output` on zeros of `shape`, shapes only."""
  x = jnp.zeros(shape, jnp.float32)
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))


def test_trunk_param_counts_match_facenet_pytorch():
  _, variables = abstract_init(InceptionResnetV1(cut="block8"), (1, 140, 140, 3))
  got = {k: count(v) for k, v in variables["params"].items()}
  # facenet-pytorch 2.6.0 InceptionResnetV1, per top-level child.
  blocks = {"repeat_1": 387_200, "mixed_6a": 1_710_080, "repeat_2": 6_900_480,
            "mixed_7a": 3_346_176, "repeat_3": 8_003_840, "block8": 1_600_768}
  # Stem: k x k convs (no bias) + BN scale/bias: cin*cout*k*k + 2*cout.
  stem = {"conv2d_1a": (3, 32, 3), "conv2d_2a": (32, 32, 3), "conv2d_2b": (32, 64, 3),
          "conv2d_3b": (64, 80, 1), "conv2d_4a": (80, 192, 3), "conv2d_4b": (192, 256, 3)}
  expected = blocks | {name: ci * co * k * k + 2 * co for name, (ci, co, k) in stem.items()}
  assert got == expected
  # 23,482,624 is facenet-pytorch's count without `logits`, i.e. still with last_linear
  # (1792x512, no bias) and last_bn (512), which this trunk leaves out.
  assert sum(got.values()) == 22_564_096
  assert sum(got.values()) + 1792 * 512 + 2 * 512 == 23_482_624


def test_trunk_cut_mixed_7a():
  (out, aux), variables = abstract_init(InceptionResnetV1(cut="mixed_7a"), (2, 140, 140, 3))
  assert out.shape == (2, 3, 3, 1792)
  assert aux["mixed_7a"].shape == out.shape
  assert set(aux) == {"conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a"}
  assert "repeat_3" not in variables["params"] and "block8" not in variables["params"]
  assert count(variables["params"]) == 22_564_096 - 8_003_840 - 1_600_768


def test_trunk_rejects_bad_cut_and_small_input():
  with pytest.raises(ValueError, match="mixed_7a"):
    abstract_init(InceptionResnetV1(cut="block17"), (1, 140, 140, 3))
  with pytest.raises(ValueError, match="75"):
    abstract_init(InceptionResnetV1(), (1, 64, 64, 3))


def test_face_head_param_count():
  _, variables = abstract_init(FaceNet(), (1, 140, 140, 3))
  params = variables["params"]
  assert set(params) == {"trunk", "head", "embedding", "logits"}
  conv = lambda cin, cout, k=1: cin * cout * k * k
  bn = lambda c: 2 * c
  head = conv(1792, 512) + bn(512)
  for i in range(5):
    c = 512 + 64 * i
    head += bn(c) + conv(c, 4 * 64) + bn(4 * 64) + conv(4 * 64, 64, 3)
  head += conv(512 + 5 * 64, 128) + bn(128)
  assert count(params["head"]) == head
  assert count(params["embedding"]) == 128 * 32 + 32
  assert count(params["logits"]) == 128 * 8 + 8


def test_auto_dtype_is_bfloat16_on_accelerators_only(monkeypatch):
  assert build.dtype_name("auto") == "float32" and build.dtype_name("bfloat16") == "bfloat16"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert build.compute_dtype("auto") == jnp.bfloat16 and build.dtype_name("float32") == "float32"
  with pytest.raises(ValueError, match=r"config.dtype='bf16': choose from \('auto'"):
    build.dtype_name("bf16")


def test_bfloat16_keeps_float32_params_and_outputs():
  (logits, aux), variables = abstract_init(FaceNet(**TINY, dtype=jnp.bfloat16), (2, 80, 80, 3))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == aux["embedding"].dtype == aux["feature"].dtype == jnp.float32


def test_tiny_face_net_forward():
  model = FaceNet(**TINY)
  images = jax.random.randint(jax.random.key(1), (3, 80, 80, 3), 0, 256).astype(jnp.uint8)
  # An "rbg" key compiles ~3x faster than threefry on CPU, which dominates this test's time.
  key = jax.random.key(0, impl="rbg")
  variables = jax.jit(model.init, static_argnames="train")(key, images, train=False)
  assert set(variables) == {"params", "batch_stats"}
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

  (logits, aux), updates = apply(variables, images, train=True, mutable=("batch_stats",))
  assert logits.shape == (3, 8) and logits.dtype == jnp.float32
  assert aux["embedding"].shape == (3, 32) and aux["feature"].shape == (3, 16)
  np.testing.assert_allclose(jnp.linalg.norm(aux["embedding"], axis=-1), 1.0, rtol=1e-5)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))

  variables = {**variables, **updates}
  logits, aux = apply(variables, images, train=False)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in (logits, aux["embedding"], aux["feature"]))
  np.testing.assert_allclose(jnp.linalg.norm(aux["embedding"], axis=-1), 1.0, rtol=1e-5)
  # Eval mode uses running statistics: an image's output ignores the rest of the batch.
  other = images.at[1:].set(255 - images[1:])
  logits_other, _ = apply(variables, other, train=False)
  np.testing.assert_allclose(logits_other[0], logits[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits_other[1:], logits[1:])
