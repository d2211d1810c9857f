"""Audio-visual fusion (README, *Fusion*): per 40 ms frame, the face feature and the audio
embedding are fused and GRUs over time (`GRU`, a `lax.scan`) feed a linear valence/arousal head.
Visual-only and audio-only models are the same module with one modality left out.
"""
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avemo_jax.models import gru_pallas, layers

MODALITIES = ("visual", "audio")
KERNELS = ("scan", "pallas", "pallas_interpret")  # `scan_grus`


class _Dense(nn.Module):
  """An `nn.Dense`'s parameters (the same names and shapes), returned rather than applied."""
  features: int
  use_bias: bool
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | float]:
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features))
    if not self.use_bias:
      return kernel, 0.0
    return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


class Recurrence(NamedTuple):
  """What a GRU's recurrence needs: its input projections of all frames (r, z, n gates,
  [T, B, H] each) and its recurrent parameters."""
  xs: tuple[jax.Array, jax.Array, jax.Array]
  w_hr: jax.Array
  w_hz: jax.Array
  w_hn: jax.Array
  b_hn: jax.Array


def scan_grus(grus: Sequence[Recurrence], unroll: int = 0, together: bool | None = None,
              kernel: str = "scan") -> list[jax.Array]:
  """Runs independent GRUs from zero states -> [B, T, H] each: by `kernel` "scan" a `lax.scan`,
  `unroll` steps per loop iteration (0: 1 on CPU, 8 on GPU/TPU), `together` in one loop (None:
  on GPU/TPU, not on CPU); "pallas" on one NVIDIA GPU one persistent kernel each way, all GRUs
  of a shape in one launch (`gru_pallas`, the sizes it `fits`), elsewhere the scan, as are
  programs lowered for other platforms too (`layers.every_platform`, `layers.portable`:
  exports); "pallas_interpret" the kernels run by XLA on any backend, slowly (tests).

  On a GPU each scan step is a few tiny kernels plus the loop's round trip, so fewer, fuller
  steps are what counts (H200, batch 64 x 750 frames, against one loop per GRU: train step +9%,
  inference +20%; unrolling 8 steps then 2.1x, 32 steps 2.3x the train step). On CPU the shared
  loop ran 12-23% slower than one loop per GRU, and unrolling slower still (README: speed).
  The gradient (`_recur`'s VJP) leaves the recurrent weights' gradients out of the backward loop.
  """
  if kernel not in KERNELS:
    raise ValueError(f"gru_kernel={kernel!r}: choose one of {KERNELS}")
  if not all(runs_kernel(kernel, g.w_hr.shape[0], *g.xs[0].shape[:2], len(grus)) for g in grus):
    kernel = "scan"
  cpu = jax.default_backend() == "cpu"
  if kernel == "scan" and len(grus) > 1 and not (together if together is not None else not cpu):
    return [h for g in grus for h in scan_grus([g], unroll)]
  hs = _recur(tuple(g.xs for g in grus), tuple(g[1:] for g in grus), unroll or (1 if cpu else 8),
              kernel)
  return [jnp.swapaxes(h_TxBxH, 0, 1) for h_TxBxH in hs]


def runs_kernel(kernel: str, units: int, frames: int = 1, rows: int = 1, grus: int = 1) -> bool:
  """Whether `scan_grus` runs `kernel`'s kernels here (not the scan) for `grus` GRUs of `units`
  over [frames, rows]: "pallas" on one NVIDIA GPU only (XLA's sharding has no rule for the
  kernels' call), in programs for this backend alone, at sizes `gru_pallas.fits`."""
  one_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
  return (kernel in ("pallas_interpret", "pallas") and (kernel != "pallas" or one_gpu)
          and layers.single_platform() and gru_pallas.fits(units, frames, rows, grus))


def check_kernel(kernel: str, tolerance: float = 1e-2) -> float:
  """`kernel` run once on a small problem (two GRUs of 6 units over 3 rows: padded) against the
  scan -> the largest relative difference of the loss and gradients; a ValueError naming
  config.fusion.gru_kernel if it fails to compile or run, or differs by more than `tolerance`
  (TF32 products on GPUs). Stages check it at the start, not after hours of the stages before."""
  keys = iter(jax.random.split(jax.random.key(0), 16))
  arr = lambda *shape: 0.5 * jax.random.normal(next(keys), shape)
  grus = [Recurrence(tuple(arr(5, 3, 6) for _ in range(3)), arr(6, 6), arr(6, 6), arr(6, 6),
                     arr(6)) for _ in range(2)]
  run = lambda k: jax.jit(jax.value_and_grad(
      lambda g: sum(jnp.sum(jnp.sin(h)) for h in scan_grus(g, kernel=k))))(grus)
  try:
    ours = run(kernel)
  except Exception as e:  # compilation or launch: the message names the key, the cause follows
    raise ValueError(f"config.fusion.gru_kernel={kernel!r} does not run here ({e}); use "
                     "'scan'") from e
  error = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), ours, run("scan"))))
  if not error <= tolerance:
    raise ValueError(f"config.fusion.gru_kernel={kernel!r} differs from the scan here by "
                     f"{error:.2g} (relative; at most {tolerance} expected): use 'scan'")
  return error


def _run(xs, weights, unroll: int, keep: bool):
  """The recurrences over all frames: (states [T, B, H] per GRU, and with `keep` what the VJP
  needs per step beside the states: the gates r, z, n and W_hn h + b_hn)."""
  def step(hs, x_t):
    out, kept = [], []
    for h, (xr, xz, xn), (w_hr, w_hz, w_hn, b_hn) in zip(hs, x_t, weights):
      r = jax.nn.sigmoid(xr + h @ w_hr)
      z = jax.nn.sigmoid(xz + h @ w_hz)
      hn = h @ w_hn + b_hn
      n = jnp.tanh(xn + r * hn)
      out.append((1.0 - z) * n + z * h)
      kept.append((r, z, n, hn))
    return tuple(out), (tuple(out), tuple(kept) if keep else ())

  h0 = tuple(jnp.zeros(x[0].shape[1:], x[0].dtype) for x in xs)
  return jax.lax.scan(step, h0, xs, unroll=unroll)[1]


def _forward(xs, weights, unroll: int, kernel: str, keep: bool):
  """`_run` by `kernel`."""
  if kernel == "scan":
    return _run(xs, weights, unroll, keep)
  out = gru_pallas.forward(list(zip(xs, weights)), keep, kernel == "pallas_interpret")
  return (tuple(h for h, _ in out), tuple(k for _, k in out)) if keep else (out, ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _recur(xs, weights, unroll: int, kernel: str):
  return _forward(xs, weights, unroll, kernel, keep=False)[0]


def _recur_fwd(xs, weights, unroll: int, kernel: str):
  hs, kept = _forward(xs, weights, unroll, kernel, keep=True)
  return hs, (weights, hs, kept)


def _recur_bwd(unroll: int, kernel: str, residuals, d_hs):
  """Back through time, the loop carries dL/dh and emits the gates' pre-activation gradients;
  the weights' gradients are then one [T*B, H]^T [T*B, H] product each, not T small products
  accumulated inside the loop (CPU fusion train step 1.4x; README: speed)."""
  weights, hs, gates = residuals
  # The state before each step is the previous step's output (zero first): derived, not kept.
  previous = tuple(jnp.concatenate([jnp.zeros_like(h[:1]), h[:-1]]) for h in hs)
  kept = tuple((p, *g) for p, g in zip(previous, gates))

  def step(dhs, inputs):
    d_out, kept_t = inputs
    carry, grads = [], []
    for dh, d, (h, r, z, n, hn), (w_hr, w_hz, w_hn, _) in zip(dhs, d_out, kept_t, weights):
      dh = dh + d
      dz = dh * (h - n) * z * (1.0 - z)
      dn = dh * (1.0 - z) * (1.0 - n * n)
      dr = dn * hn * r * (1.0 - r)
      dhn = dn * r
      carry.append(dh * z + dr @ w_hr.T + dz @ w_hz.T + dhn @ w_hn.T)
      grads.append((dr, dz, dn, dhn))
    return tuple(carry), tuple(grads)

  if kernel == "scan":
    dh0 = tuple(jnp.zeros_like(d[0]) for d in d_hs)
    grads = jax.lax.scan(step, dh0, (d_hs, kept), reverse=True, unroll=unroll)[1]
  else:
    grads = gru_pallas.backward(list(zip(d_hs, hs, gates, weights)), kernel == "pallas_interpret")
  flat = lambda a: a.reshape(-1, a.shape[-1])
  d_xs = tuple((dr, dz, dn) for dr, dz, dn, _ in grads)
  d_weights = tuple((flat(h).T @ flat(dr), flat(h).T @ flat(dz), flat(h).T @ flat(dhn),
                     dhn.sum((0, 1)))
                    for (dr, dz, _, dhn), (h, *_) in zip(grads, kept))
  return d_xs, d_weights


_recur.defvjp(_recur_fwd, _recur_bwd)


class GRU(nn.Module):
  """`nn.GRUCell` run over [B, T, D] -> [B, T, H] from a zero state, with that cell's parameters
  (ir, iz, in, hr, hz, hn) and initialisers, and the input projections of all frames computed
  before the recurrence (three [T*B, D] x [D, H] products, not 3T small ones inside the loop).
  Inside, one product per gate: slicing one [H, 3H] product's result per step ran 2.4x slower
  on CPU. `scan=False` returns the `Recurrence` instead, for `scan_grus` to run with
  others."""
  features: int
  unroll: int = 0  # `scan_grus`
  kernel: str = "scan"  # `scan_grus`

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, *, scan: bool = True) -> jax.Array | Recurrence:
    h, d = self.features, x_BxTxD.shape[-1]
    orthogonal = nn.initializers.orthogonal()
    ir, iz, i_n = (_Dense(h, True, name=n)(d) for n in ("ir", "iz", "in"))
    (w_hr, _), (w_hz, _) = (_Dense(h, False, orthogonal, name=n)(h) for n in ("hr", "hz"))
    w_hn, b_hn = _Dense(h, True, orthogonal, name="hn")(h)
    x_TxBxD = jnp.swapaxes(x_BxTxD, 0, 1)
    xs = tuple(x_TxBxD @ w + b for w, b in (ir, iz, i_n))
    recurrence = Recurrence(xs, w_hr, w_hz, w_hn, b_hn)
    return scan_grus([recurrence], self.unroll, kernel=self.kernel)[0] if scan else recurrence


class FusionGRU(nn.Module):
  """{modality: [B, T, D_m]}, lengths [B] -> (valence/arousal [B, T, 2], {"hidden": [B, T, H]}).

  level "model" (default): each modality runs through its own GRU; their per-frame states are
  concatenated and feed `num_layers` more GRU layers (0: straight to the head). With one
  modality this is exactly a single-modality GRU model. level "feature": the features are
  concatenated and feed `num_layers` (>= 1) GRU layers. Measured on the synthetic recordings
  (README): the feature-level GRU fits the training people through whichever modality is easier
  and trails audio alone on arousal; model level beats both single modalities on valence, and on
  arousal in the mean of 5 seeds (not in every run).

  Features are expected standardised per dimension (the frozen extractors' features live on
  different scales; `avemo_jax.train.features.standardize` does it with training-set statistics:
  a per-frame LayerNorm would erase the feature magnitude, which carries intensity). Frames at
  t >= length are padding: the GRUs run forward in time, so outputs at t < length never depend
  on them; outputs at t >= length are meaningless and callers mask them out (`lengths_B` is
  not needed to compute them; exported models and callers share this interface).
  """
  modalities: Sequence[str] = MODALITIES
  hidden: int = 128
  num_layers: int = 0
  dropout: float = 0.1
  modality_dropout: float = 0.0  # training: P(a modality is zeroed for a whole sequence)
  level: str = "model"
  unroll: int = 0  # GRU steps per `lax.scan` iteration (`scan_grus`; 0: by backend)
  gru_kernel: str = "scan"  # "pallas": one persistent kernel each way on GPUs (`scan_grus`)

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
    gru = lambda name: GRU(self.hidden, self.unroll, self.gru_kernel, name=f"gru_{name}")
    inputs = [nn.Dropout(self.dropout, deterministic=not train)(features[m].astype(jnp.float32))
              for m in self.modalities]
    if self.level == "model":
      inputs = scan_grus([gru(m)(x, scan=False) for m, x in zip(self.modalities, inputs)],
                         self.unroll, kernel=self.gru_kernel)
    if train and self.modality_dropout and len(inputs) > 1:
      # ModDrop (Neverova et al. 2016): the model must use each modality on its own as well,
      # instead of fitting the training people through whichever is easier. Never all at once.
      keep_BxM = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.modality_dropout,
                                      (inputs[0].shape[0], len(inputs)))
      keep_BxM |= ~keep_BxM.any(axis=1, keepdims=True)
      inputs = [x * keep_BxM[:, i, None, None] for i, x in enumerate(inputs)]
    x = jnp.concatenate(inputs, axis=-1)
    for i in range(self.num_layers):
      x = gru(i)(x)
    return nn.Dense(2, name="va_head")(x), {"hidden": x}
