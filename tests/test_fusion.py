"""CCC, the VGGish and fusion models, the GRU against hand-written (and torch) recurrences,
learning on synthetic features, and the audio + fusion stages end to end on `:tiny`."""
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from avemo_jax import losses, metrics
from avemo_jax.data import sequences
from avemo_jax.models.audio import VGGish
from avemo_jax.models import fusion as fusion_model
from avemo_jax.models import gru_pallas, layers
from avemo_jax.models.fusion import GRU, FusionGRU, Recurrence, scan_grus
from avemo_jax.train import build, stages, steps
from avemo_jax.train import state as state_lib
from configs import common, fusion


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_ccc_by_hand():
  x = np.array([1.0, 2.0, 3.0])
  assert metrics.ccc(x, x) == pytest.approx(1.0)
  # y = x + 1: cov = var = 2/3, (mean diff)^2 = 1 -> 2 (2/3) / (4/3 + 1) = 4/7.
  assert metrics.ccc(x, x + 1) == pytest.approx(4 / 7)
  assert metrics.ccc(x - 2, 2 - x) == pytest.approx(-1.0)  # centred, mirrored
  # Scale: y = 2x: cov = 4/3, var y = 8/3 -> (8/3) / (2/3 + 8/3 + 4) = 8/22.
  assert metrics.ccc(x, 2 * x) == pytest.approx(8 / 22)
  with pytest.raises(ValueError, match="1-D"):
    metrics.ccc(x[None], x[None])


def test_ccc_loss_masked_matches_metric_and_gradient():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(2, 50)), rng.normal(size=(2, 50))
  mask = np.arange(50) < 37  # the last 13 frames are padding: they must not count
  got = np.asarray(losses.ccc(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), mask))
  want = [metrics.ccc(x[d, :37], y[d, :37]) for d in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  f = lambda a: losses.ccc(a, jnp.asarray(y), jnp.asarray(mask))
  with jax.enable_x64():
    check_grads(f, (jnp.asarray(x),), order=1, modes=("rev",))
    # Hand-derived gradient of CCC w.r.t. x_i (unmasked): d/dx_i [2 s_xy / D] =
    # 2 / (N D) (y_i - my) - 2 s_xy / (N D^2) (2 (x_i - mx) + 2 (mx - my)).
    xv, yv = x[0, :37], y[0, :37]
    n, mx, my = 37, xv.mean(), yv.mean()
    sxy = np.mean((xv - mx) * (yv - my))
    d = xv.var() + yv.var() + (mx - my) ** 2
    hand = 2 / (n * d) * (yv - my) - 2 * sxy / (n * d * d) * (2 * (xv - mx) + 2 * (mx - my))
    grad = jax.grad(lambda a: f(a)[0])(jnp.asarray(x))
    np.testing.assert_allclose(grad[0, :37], hand, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(grad[0, 37:], 0.0)


def test_ccc_report_concatenated_and_mean():
  t1 = np.stack([np.linspace(-1, 1, 20), np.linspace(1, -1, 20)], 1)
  t2 = np.stack([np.sin(np.arange(30.0)), np.cos(np.arange(30.0))], 1)
  p1, p2 = t1 * 0.5, t2 + 0.2
  r = metrics.ccc_report([p1, p2], [t1, t2])
  assert r["ccc_valence"] == pytest.approx(
      metrics.ccc(np.r_[p1[:, 0], p2[:, 0]], np.r_[t1[:, 0], t2[:, 0]]))
  assert r["ccc_arousal_mean"] == pytest.approx(
      (metrics.ccc(p1[:, 1], t1[:, 1]) + metrics.ccc(p2[:, 1], t2[:, 1])) / 2)


def test_vggish_param_count_and_shapes():
  out, variables = jax.eval_shape(lambda: VGGish().init_with_output(
      jax.random.key(0), jnp.zeros((2, 96, 64))))
  params = dict(variables["params"])
  head = params.pop("va_head")
  assert count(params) == 72_141_184  # VGGish (the paper's), without our regression head
  assert count(head) == 128 * 2 + 2
  assert out[0].shape == (2, 2) and out[1]["embedding"].shape == (2, 128)
  assert count(params["fc1_1"]["kernel"]) == 6 * 4 * 512 * 4096  # NHWC flatten of 6x4x512
  with pytest.raises(ValueError, match=r"\[B, 96, 64\]"):
    VGGish().init(jax.random.key(0), jnp.zeros((1, 90, 64)))


def test_vggish_embedding_relu_and_float32_read_outs():
  """`embedding_relu=False` is the current AudioSet embedding (fc2 without activation); the
  embedding and the valence/arousal head stay float32 in a bf16 network."""
  tiny = dict(width=0.125, fc_dim=32, embed_dim=16)
  mel = jnp.asarray(np.random.default_rng(0).normal(size=(4, 96, 64)), jnp.float32)
  variables = jax.jit(VGGish(**tiny).init)(jax.random.key(0), mel)
  relu, linear = (jax.jit(VGGish(**tiny, embedding_relu=r).apply)(variables, mel)[1]["embedding"]
                  for r in (True, False))
  assert float(linear.min()) < 0 and np.array_equal(relu, np.maximum(linear, 0))
  va, out = jax.jit(VGGish(**tiny, dtype=jnp.bfloat16).apply)(variables, mel)
  embedding = out["embedding"]
  assert va.dtype == embedding.dtype == jnp.float32
  head = variables["params"]["va_head"]
  np.testing.assert_allclose(va, embedding @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)


def test_fusion_param_count():
  x = {"visual": jnp.zeros((1, 5, 128)), "audio": jnp.zeros((1, 5, 128))}
  params = lambda model: jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, jnp.array([5])))["params"]
  # A GRU on D inputs: input kernels + biases 3 x (D x 128 + 128), recurrent kernels
  # 3 x 128 x 128, candidate recurrent bias 128.
  gru = lambda d: 3 * (d * 128 + 128) + 3 * 128 * 128 + 128
  # Model level: one GRU per modality, head on the 256 concatenated states.
  assert count(params(FusionGRU(hidden=128))) == 2 * gru(128) + 256 * 2 + 2
  # Feature level: one GRU on the 256 concatenated features, head 128 x 2 + 2.
  assert count(params(FusionGRU(hidden=128, level="feature", num_layers=1))) == gru(256) + 258
  with pytest.raises(ValueError, match="num_layers >= 1"):
    FusionGRU(level="feature").init(jax.random.key(0), x, jnp.array([5]))


def test_model_level_fusion_is_the_single_modality_grus_concatenated():
  rng = np.random.default_rng(0)
  x = {"visual": rng.normal(size=(2, 6, 3)).astype(np.float32),
       "audio": rng.normal(size=(2, 6, 5)).astype(np.float32)}
  lengths = np.array([6, 3])
  fused = FusionGRU(hidden=4, dropout=0.0)
  variables = fused.init(jax.random.key(0), x, lengths)
  pred, _ = fused.apply(variables, x, lengths)
  p = variables["params"]
  states = []
  for m in ("visual", "audio"):
    single = FusionGRU(modalities=(m,), hidden=4, dropout=0.0)
    mine = {f"gru_{m}": p[f"gru_{m}"], "va_head": {"kernel": jnp.zeros((4, 2)),
                                                   "bias": jnp.zeros(2)}}
    states.append(single.apply({"params": mine}, {m: x[m]}, lengths)[1]["hidden"])
  head = p["va_head"]
  want = jnp.concatenate(states, axis=-1) @ head["kernel"] + head["bias"]
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(pred)[b, :n], np.asarray(want)[b, :n], atol=1e-6)


def _gru_by_hand(p, x_TxD, h):
  """The GRU recurrence, written out: r, z gates; candidate n with r applied to W_hn h + b_hn."""
  sig = lambda a: 1 / (1 + np.exp(-a))
  dense = lambda name, v: v @ p[name]["kernel"] + p[name].get("bias", 0.0)
  out = []
  for x in x_TxD:
    r = sig(dense("ir", x) + dense("hr", h))
    z = sig(dense("iz", x) + dense("hz", h))
    n = np.tanh(dense("in", x) + r * dense("hn", h))
    h = (1 - z) * n + z * h
    out.append(h)
  return np.stack(out)


@pytest.fixture(scope="module")
def gru_setup():
  model = FusionGRU(modalities=("audio",), hidden=6, dropout=0.0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 4)).astype(np.float32)
  lengths = np.array([7, 4])
  variables = model.init(jax.random.key(1), {"audio": x}, lengths)
  pred, aux = model.apply(variables, {"audio": x}, lengths)
  return model, variables, x, lengths, np.asarray(pred), np.asarray(aux["hidden"])


def test_gru_matches_hand_recurrence_with_padding(gru_setup):
  _, variables, x, lengths, pred, hidden = gru_setup
  p = jax.tree.map(np.asarray, variables["params"])
  for b in range(2):
    n = lengths[b]
    want = _gru_by_hand(p["gru_audio"], x[b, :n], np.zeros(6))
    np.testing.assert_allclose(hidden[b, :n], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred[b, :n], want @ p["va_head"]["kernel"] + p["va_head"]["bias"],
                               rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_valid_frames(gru_setup):
  model, variables, x, _, pred, _ = gru_setup
  alone, _ = model.apply(variables, {"audio": x[1:, :4]}, np.array([4]))
  garbage = x.copy()
  garbage[1, 4:] = 1e3  # whatever sits in the padding
  padded, _ = model.apply(variables, {"audio": garbage}, np.array([7, 4]))
  np.testing.assert_allclose(np.asarray(padded)[1, :4], np.asarray(alone)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(padded)[1, :4], pred[1, :4], rtol=1e-5, atol=1e-6)


def test_gru_is_flax_gru_cell_with_the_input_projections_hoisted():
  """Same parameter names, initial values (same RNG paths) and outputs as nn.RNN(nn.GRUCell)."""
  class Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
      return GRU(6, name="gru")(x)

  class Flax(nn.Module):  # as FusionGRU built its GRUs before
    @nn.compact
    def __call__(self, x):
      return nn.RNN(nn.GRUCell(6, name="gru"), name="rnn")(x)

  x = np.random.default_rng(0).normal(size=(3, 9, 5)).astype(np.float32)
  ours, flax_rnn = Ours(), Flax()
  mine, theirs = ours.init(jax.random.key(0), x), flax_rnn.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, mine, theirs)
  np.testing.assert_allclose(ours.apply(mine, x), flax_rnn.apply(mine, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("unroll,together", [(0, None), (1, True), (4, True), (3, False)])
def test_grus_run_together_or_alone_and_unrolled_alike(unroll, together):
  """`scan_grus` (model level runs the modalities' GRUs through it): each GRU's states equal it
  run alone, in one shared loop or not, whatever the unroll."""
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(2, 9, d)).astype(np.float32) for d in (5, 3)]
  grus = [GRU(6, name=f"g{i}") for i in range(2)]
  variables = [g.init(jax.random.key(i), x) for i, (g, x) in enumerate(zip(grus, xs))]
  recurrences = [g.apply(v, x, scan=False) for g, v, x in zip(grus, variables, xs)]
  hs = scan_grus(recurrences, unroll, together)
  for g, v, x, h in zip(grus, variables, xs, hs):
    np.testing.assert_allclose(h, g.apply(v, x), rtol=1e-6, atol=1e-6)
  features = dict(zip(("visual", "audio"), xs))
  model = FusionGRU(hidden=6, unroll=unroll)
  variables = model.init(jax.random.key(0), features, np.array([9, 9]))
  _, aux = model.apply(variables, features, np.array([9, 9]))
  for i, m in enumerate(model.modalities):
    alone = GRU(6).apply({"params": variables["params"][f"gru_{m}"]}, features[m])
    np.testing.assert_allclose(aux["hidden"][..., 6 * i:6 * (i + 1)], alone, rtol=1e-6, atol=1e-6)


def _recurrence_by_hand(g):
  """`scan_grus`'s recurrence as a Python loop of jnp operations (for autodiff) -> [B, T, H]."""
  (xr, xz, xn), h, out = g.xs, jnp.zeros(g.xs[0].shape[1:]), []
  for t in range(xr.shape[0]):
    r = jax.nn.sigmoid(xr[t] + h @ g.w_hr)
    z = jax.nn.sigmoid(xz[t] + h @ g.w_hz)
    h = (1 - z) * jnp.tanh(xn[t] + r * (h @ g.w_hn + g.b_hn)) + z * h
    out.append(h)
  return jnp.stack(out, 1)


@pytest.mark.parametrize("unroll,together,kernel", [
    (1, True, "scan"), (3, True, "scan"), (1, False, "scan"), (0, None, "pallas_interpret")])
def test_gru_gradient_is_autodiffs(unroll, together, kernel):
  """The hand-written VJP (weights' gradients after the backward loop) equals autodiff's, with
  the scan or the Pallas kernels (rows 3 -> 16 and units 6 -> 16 padded)."""
  rng = np.random.default_rng(1)
  arr = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  grus = [Recurrence(tuple(arr(11, 3, 6) for _ in range(3)), *(arr(6, 6, scale=0.5)
                                                               for _ in range(3)), arr(6))
          for _ in range(2)]
  targets = [arr(3, 11, 6) for _ in grus]
  loss = lambda hs: sum(jnp.sum(jnp.sin(h) * t) for h, t in zip(hs, targets))
  ours = jax.grad(lambda g: loss(scan_grus(g, unroll, together, kernel)))(grus)
  theirs = jax.grad(lambda g: loss([_recurrence_by_hand(x) for x in g]))(grus)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), ours, theirs)


def test_pallas_kernels_equal_the_scan():
  """`gru_pallas` (interpreted here): GRUs of two shapes (a launch each) and FusionGRU give the
  scan's states; "pallas" off a GPU, over MAX_UNITS and in an export for several platforms is
  the scan; unknown kernels fail by name. (On CUDA: tests/test_gru_pallas.py.)"""
  rng = np.random.default_rng(2)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)
  grus = [Recurrence(tuple(arr(7, b, h) for _ in range(3)), arr(h, h), arr(h, h), arr(h, h),
                     arr(h)) for b, h in ((2, 5), (17, 32), (2, 5))]
  for ours, scan in zip(scan_grus(grus, kernel="pallas_interpret"), scan_grus(grus)):
    np.testing.assert_allclose(ours, scan, rtol=1e-5, atol=1e-6)
  features = {"visual": arr(3, 9, 4), "audio": arr(3, 9, 2)}
  lengths = np.array([9, 9, 9])
  variables = FusionGRU(hidden=6).init(jax.random.key(0), features, lengths)
  outputs = lambda kernel: FusionGRU(hidden=6, gru_kernel=kernel).apply(variables, features,
                                                                       lengths)[0]
  np.testing.assert_allclose(outputs("pallas_interpret"), outputs("scan"), rtol=1e-5, atol=1e-6)
  model = FusionGRU(hidden=6, gru_kernel="pallas")
  with layers.every_platform():
    exported = jax.export.export(jax.jit(model.apply), platforms=["cpu", "cuda"])(
        variables, features, lengths)
  np.testing.assert_allclose(exported.call(variables, features, lengths)[0], outputs("scan"),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(model.apply(variables, features, lengths)[0], outputs("scan"))
  big = [Recurrence(tuple(arr(2, 1, 129) for _ in range(3)), *(arr(129, 129) / 20 for _ in
                                                                range(3)), arr(129))]
  assert not gru_pallas.fits(129) and gru_pallas.fits(gru_pallas.MAX_UNITS)
  assert gru_pallas.fits(64, 7_501, 2_048, 2) and not gru_pallas.fits(64, 7_501, 2_240, 2)
  np.testing.assert_array_equal(scan_grus(big, kernel="pallas_interpret")[0], scan_grus(big)[0])
  with pytest.raises(ValueError, match="gru_kernel='cudnn': choose one of"):
    FusionGRU(hidden=6, gru_kernel="cudnn").apply(variables, features, lengths)


def test_pallas_off_one_gpu_is_announced(caplog):
  """A config asking for the Pallas GRU where it cannot run says so at the start, by key."""
  config = fusion.get_config("tiny")
  with config.unlocked():
    config.fusion.gru_kernel = "pallas"
  with caplog.at_level("WARNING"):
    stages.validate(config)
  assert "config.fusion.gru_kernel='pallas' runs on one NVIDIA GPU" in caplog.text
  assert "here (8 cpu devices, fusion.hidden=16)" in caplog.text


def test_check_kernel_fails_early_by_key(monkeypatch):
  """The start-of-run check (`stages.validate` on one GPU): the kernels agree with the scan; a
  kernel 5% off, or one that does not compile, fails by key with the way out."""
  assert fusion_model.check_kernel("pallas_interpret") < 1e-5
  forward = gru_pallas.forward
  monkeypatch.setattr(gru_pallas, "forward", lambda grus, keep, interpret: jax.tree.map(
      lambda x: 1.05 * x, forward(grus, keep, interpret)))
  with pytest.raises(ValueError, match=r"gru_kernel='pallas_interpret' differs .* use 'scan'"):
    fusion_model.check_kernel("pallas_interpret")

  def broken(grus, keep, interpret):
    raise RuntimeError("Triton compilation failed")
  monkeypatch.setattr(gru_pallas, "forward", broken)
  with pytest.raises(ValueError, match=r"'pallas_interpret' does not run here \(Triton "
                                       r"compilation failed\); use 'scan'"):
    fusion_model.check_kernel("pallas_interpret")


def test_gru_matches_torch(gru_setup):
  torch = pytest.importorskip("torch")
  _, variables, x, lengths, _, hidden = gru_setup
  p = jax.tree.map(np.asarray, variables["params"])
  g = p["gru_audio"]
  gru = torch.nn.GRU(4, 6, batch_first=True)
  stack = lambda keys, part: torch.tensor(np.concatenate([g[k][part].T for k in keys]))
  with torch.no_grad():  # torch stacks the gates (r, z, n) along the output axis
    gru.weight_ih_l0.copy_(stack(("ir", "iz", "in"), "kernel"))
    gru.weight_hh_l0.copy_(stack(("hr", "hz", "hn"), "kernel"))
    gru.bias_ih_l0.copy_(stack(("ir", "iz", "in"), "bias"))
    gru.bias_hh_l0.copy_(torch.tensor(np.concatenate([np.zeros(12), g["hn"]["bias"]])))
  packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(x), torch.tensor(lengths),
                                                   batch_first=True)
  out, _ = torch.nn.utils.rnn.pad_packed_sequence(gru(packed)[0], batch_first=True)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(hidden[b, :n], out[b, :n].detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frames", [4, 9])
def test_windows_are_the_recordings_frames_then_zeros(frames):
  """Windows cut on the device equal slices of the recordings, zero from a recording's end on
  (also when the window is longer than the recordings: frames=9)."""
  rng = np.random.default_rng(0)
  table = {"audio": rng.normal(size=(3, 7, 2)).astype(np.float32),
           "labels": rng.normal(size=(3, 7, 2)).astype(np.float32),
           "lengths": np.array([7, 3, 5], np.int32)}
  recording, start = np.array([0, 1, 2, 0, 2]), np.array([3, 0, 1, 0, 0]) * (frames == 4)
  got = jax.jit(steps.windows, static_argnums=2)(table, {"recording": recording, "start": start},
                                                 frames)
  for i, (r, s) in enumerate(zip(recording, start)):
    n = min(frames, table["lengths"][r])
    assert got["lengths"][i] == n
    for key in ("audio", "labels"):
      want = np.zeros((frames, 2), np.float32)
      want[:n] = table[key][r, s:s + n]
      np.testing.assert_array_equal(got[key][i], want)


def test_fusion_learns_on_synthetic_features():
  """A GRU reaches dev CCC > 0.8 on features that carry smoothed valence/arousal plus noise."""
  rng = np.random.default_rng(0)
  cfg = common.fusion_config(tiny=True)
  cfg.train.num_steps, cfg.train.learning_rate = 150, 1e-2
  mix = rng.normal(size=(2, 8))  # the same "extractor" for train and dev

  def make(n):
    va = np.stack([np.stack([sequences.smooth_trajectory(rng, 120) for _ in range(2)], 1)
                   for _ in range(n)])
    return {"audio": (va @ mix + 0.3 * rng.normal(size=(n, 120, 8))).astype(np.float32),
            "labels": va.astype(np.float32), "lengths": np.full(n, 120, np.int32)}

  train, dev = make(16), make(4)
  model = build.fusion_model(cfg, ("audio",))
  state = state_lib.create(model, cfg.train, jax.random.key(0), build.fusion_inputs({"audio": 8}))
  step = jax.jit(functools.partial(steps.fusion_step, frames=60, weights={"ccc": 1.0}, seed=0))
  for i in range(cfg.train.num_steps):
    windows = {"recording": rng.integers(0, 16, 4), "start": rng.integers(0, 61, 4)}
    state, _ = step(state, train, windows)
  assert step._cache_size() == 1
  pred, _ = model.apply(state.variables, dev, dev["lengths"])
  report = metrics.ccc_report(list(np.asarray(pred)), list(dev["labels"]))
  assert report["ccc_valence"] > 0.8 and report["ccc_arousal"] > 0.8, report


def test_tiny_fusion_end_to_end(tmp_path):
  summary = stages.run(fusion.get_config("tiny"), tmp_path)
  assert set(summary) >= {"teacher", "student", "audio", "fusion"}
  for model in ("audio", "visual", "fused"):
    entry = summary["fusion"][model]
    for key in ("ccc_valence", "ccc_arousal", "ccc_valence_mean", "ccc_arousal_mean"):
      assert -1.0 <= entry[key] <= 1.0
    lines = (tmp_path / "fusion" / model / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20 and "eval_ccc_valence" in lines[-1]
  assert json.loads((tmp_path / "summary.json").read_text())["fusion"] == summary["fusion"]
  by_condition = summary["fusion_by_condition"]
  assert set(by_condition) == {"both present", "voice silent", "face hidden"}
  both = by_condition["both present"]
  assert both["frames"] > 1 and -1.0 <= both["fused"]["ccc_arousal"] <= 1.0
  plots = {p.name for p in (tmp_path / "fusion" / "plots").glob("*.png")}
  assert plots == {"dev_1.png", "dev_2.png"}
  for entry in summary["fusion"].values():  # what each CCC covers: recordings, their frames
    assert {r: e["frames"] for r, e in entry["recordings"].items()} == {"dev_1": 200, "dev_2": 200}
  cache = tmp_path / "fusion" / "features_train.npz"
  with np.load(cache) as f:
    assert f["visual"].shape == (4, 100, 16) and f["audio"].shape == (4, 100, 16)
  # Rerun with only the fusion stage, reusing the trained extractors: the cache is read, not
  # recomputed, and the earlier stages' summary entries are kept.
  config = fusion.get_config("tiny")
  config.stages = ("fusion",)
  config.student_checkpoint = str(tmp_path / "student")
  config.audio_checkpoint = str(tmp_path / "audio")
  mtime = cache.stat().st_mtime_ns
  again = stages.run(config, tmp_path)
  assert cache.stat().st_mtime_ns == mtime
  drop_time = lambda d: {m: {k: v for k, v in e.items() if k != "train_seconds"}
                         for m, e in d["fusion"].items()}
  assert drop_time(again) == drop_time(summary) and "teacher" in again
  # Another fusion seed retrains the GRUs (the old checkpoints set aside) on the same features.
  config.fusion.seed, config.fusion.models = 1, ("audio",)
  reseeded = stages.run(config, tmp_path)
  assert cache.stat().st_mtime_ns == mtime
  assert reseeded["fusion"]["audio"]["ccc_arousal"] != summary["fusion"]["audio"]["ccc_arousal"]
  assert list((tmp_path / "fusion" / "audio" / "stale").iterdir())


def test_modality_dropout_zeroes_whole_modalities_never_all():
  rng = np.random.default_rng(0)
  x = {"visual": rng.normal(size=(16, 5, 3)).astype(np.float32),
       "audio": rng.normal(size=(16, 5, 4)).astype(np.float32)}
  lengths = np.full(16, 5)
  make = lambda p: FusionGRU(hidden=4, dropout=0.0, modality_dropout=p, level="feature",
                             num_layers=1)
  variables = make(0.0).init(jax.random.key(0), x, lengths)
  run = lambda p, feats: np.asarray(make(p).apply(variables, feats, lengths, train=True,
                                                  rngs={"dropout": jax.random.key(3)})[0])
  zero = lambda m: {**x, m: np.zeros_like(x[m])}
  candidates = [run(0.0, x), run(0.0, zero("visual")), run(0.0, zero("audio"))]
  got = run(0.5, x)
  which = [next(i for i, c in enumerate(candidates) if np.allclose(got[b], c[b], atol=1e-6))
           for b in range(16)]  # each sequence: all kept, or exactly one modality zeroed
  assert set(which) == {0, 1, 2}
  np.testing.assert_allclose(run(1.0, x), candidates[0], atol=1e-6)  # never both dropped
  np.testing.assert_allclose(np.asarray(make(0.9).apply(variables, x, lengths)[0]),
                             candidates[0], atol=1e-6)  # evaluation: nothing dropped
