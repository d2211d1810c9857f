"""Models from their config sections, and example inputs to initialise them."""
import jax
import jax.numpy as jnp
import ml_collections

from avemo_jax.models import audio, face, fusion


DTYPES = ("auto", "float32", "bfloat16")


def dtype_name(name: str) -> str:
  """config.dtype resolved: "auto" is bfloat16 on GPU and TPU (H200: README, speed) and float32
  on CPU (where bfloat16 gained nothing). float16 is not offered: it would need loss scaling,
  which bfloat16 (float32's exponent range) does not."""
  if name not in DTYPES:
    raise ValueError(f"config.dtype={name!r}: choose from {DTYPES}")
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def compute_dtype(name: str) -> jnp.dtype:
  """config.dtype -> the networks' computation dtype (`dtype_name`)."""
  return jnp.dtype(dtype_name(name))


def face_model(m: ml_collections.ConfigDict, *, dtype: str = "float32",
               axis_name: str | None = None) -> face.FaceNet:
  """`dtype`: computation dtype (config.dtype); `axis_name`: the pmap axis, for BatchNorm."""
  return face.FaceNet(cut=m.cut, width=m.width, depth=tuple(m.depth),
                      proj_features=m.proj_features, dense_layers=m.dense_layers,
                      growth=m.growth, feature_dim=m.feature_dim, embed_dim=m.embed_dim,
                      num_classes=m.num_classes, dtype=compute_dtype(dtype), axis_name=axis_name)


def face_inputs(size: int) -> tuple[jax.Array]:
  """Example inputs for initialising a face network on `size` x `size` crops."""
  return (jnp.zeros((1, size, size, 3), jnp.uint8),)


def audio_model(a: ml_collections.ConfigDict, *, dtype: str = "float32") -> audio.VGGish:
  return audio.VGGish(width=a.width, fc_dim=a.fc_dim, embed_dim=a.embed_dim,
                      embedding_relu=a.get("embedding_relu", True),  # workdirs before 12-03
                      dtype=compute_dtype(dtype))


def audio_inputs() -> tuple[jax.Array]:
  return (jnp.zeros((1, audio.NUM_FRAMES, audio.NUM_BANDS), jnp.float32),)


def fusion_model(f: ml_collections.ConfigDict, modalities: tuple[str, ...]) -> fusion.FusionGRU:
  return fusion.FusionGRU(modalities=modalities, hidden=f.hidden, num_layers=f.num_layers,
                          dropout=f.dropout, modality_dropout=f.modality_dropout, level=f.level,
                          # configs saved before they had these keys: their defaults
                          unroll=f.get("unroll", 0), gru_kernel=f.get("gru_kernel", "scan"))


def fusion_inputs(dims: dict[str, int]) -> tuple[dict[str, jax.Array], jax.Array]:
  """Example (features, lengths) with feature sizes `dims` ({modality: D})."""
  return ({m: jnp.zeros((1, 2, d), jnp.float32) for m, d in dims.items()},
          jnp.ones((1,), jnp.int32))
