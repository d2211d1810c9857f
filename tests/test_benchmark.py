"""tools/benchmark.py: the PyTorch peer matches our networks, and a --quick run writes the JSON
and Markdown the README documents. No timing is asserted."""
import gzip
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from avemo_jax import benchmark, losses
from avemo_jax.models import gru_pallas
from avemo_jax.models.fusion import FusionGRU
from avemo_jax.train import build
from configs import audio, distill, fusion

torch = pytest.importorskip("torch")
bt = pytest.importorskip("avemo_jax.benchmark_torch")

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODALITIES = ("visual", "audio")


def _params(model, *inputs) -> int:
  return benchmark.num_params(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs,
                                                                   train=False)))


def _dims(config) -> dict[str, int]:
  return {"visual": config.model.feature_dim, "audio": config.audio.embed_dim}


@pytest.mark.parametrize("arg", ["tiny", None])
def test_peer_parameter_counts_equal_ours(arg):
  config = fusion.get_config(arg)
  face = build.face_model(config.model)
  counts = {"face": (bt.num_params(bt.FaceNet(config.model)),
                     _params(face, *build.face_inputs(config.data.image_size)))}
  counts["audio"] = (bt.num_params(bt.VGGish(config.audio)),
                     _params(build.audio_model(config.audio), *build.audio_inputs()))
  gru = bt.FusionGRU(config.fusion, MODALITIES, _dims(config))
  # torch's GRU has b_hr and b_hz beside b_ir and b_iz: 2 x hidden more per layer.
  counts["fusion"] = (bt.num_params(gru) - bt.redundant_gru_biases(gru),
                      _params(build.fusion_model(config.fusion, MODALITIES),
                              *build.fusion_inputs(_dims(config))))
  assert bt.redundant_gru_biases(gru) == 2 * 2 * config.fusion.hidden
  for name, (theirs, ours) in counts.items():
    assert theirs == ours, name
  if arg is None:  # the paper's full sizes: VGGish 72,141,184 + the 2-output head
    assert counts["audio"][1] == 72_141_184 + 128 * 2 + 2


def test_peer_outputs_have_our_shapes():
  config = distill.get_config("tiny")
  size, rng = config.data.image_size, np.random.default_rng(0)
  images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  face = build.face_model(config.model)
  # Shapes only, traced (run eagerly, each layer a program of its own: 41-47 s in the suite).
  logits, aux = jax.eval_shape(
      lambda: face.apply(face.init(jax.random.key(0), images, train=False), images, train=False))
  t_logits, t_embedding = bt.FaceNet(config.model).eval()(bt.to_torch(images, "cpu", nchw=True))
  assert tuple(t_logits.shape) == logits.shape
  assert tuple(t_embedding.shape) == aux["embedding"].shape
  np.testing.assert_allclose(t_embedding.detach().norm(dim=-1).numpy(), 1.0, rtol=1e-5)

  a = audio.get_config("tiny").audio
  mel = rng.normal(size=(2, 96, 64)).astype(np.float32)
  vgg = build.audio_model(a)
  va, aux = jax.eval_shape(lambda: vgg.apply(vgg.init(jax.random.key(0), mel), mel))
  t_va, t_emb = bt.VGGish(a)(torch.from_numpy(mel))
  assert (tuple(t_va.shape), tuple(t_emb.shape)) == (va.shape, aux["embedding"].shape)

  dims = _dims(config)
  feats = {m: rng.normal(size=(2, 7, d)).astype(np.float32) for m, d in dims.items()}
  gru = build.fusion_model(config.fusion, MODALITIES)
  lengths = np.full(2, 7, np.int32)
  pred, _ = jax.eval_shape(
      lambda: gru.apply(gru.init(jax.random.key(0), feats, lengths), feats, lengths))
  t_pred = bt.FusionGRU(config.fusion, MODALITIES, dims).eval()(bt.to_torch(feats, "cpu"))
  assert tuple(t_pred.shape) == pred.shape


def test_peer_triplet_loss_is_ours():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(6, 3, 4)).astype(np.float32)
  labels, margins = np.array([0, 1, 2, 2, 1, 0]), rng.uniform(0.1, 0.3, 6).astype(np.float32)
  ours = losses.triplet_loss(emb, labels, margins)
  theirs = bt._triplet_loss(torch.from_numpy(emb), torch.from_numpy(labels),
                            torch.from_numpy(margins))
  np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-5, atol=1e-6)


def test_quick_run_writes_the_documented_json(tmp_path):
  """Every model row, side by side (the host rows: the next test and test_predict.py)."""
  units = {"face_train": "images/s", "face_infer": "images/s", "audio_train": "examples/s",
           "fusion_train": "sequences/s", "fusion_infer": "sequences/s"}
  rows = (*units, "predict_fps")
  out, table = tmp_path / "bench.json", tmp_path / "bench.md"
  done = subprocess.run(
      [sys.executable, "tools/benchmark.py", "--quick", f"--only={','.join(rows)}",
       f"--out={out}", f"--markdown={table}", f"--profile={tmp_path / 'profile'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert tuple(results) == rows
  for name, unit in units.items():
    row = results[name]
    assert set(row) == {"jax", "torch", "ratio"}
    for side in ("jax", "torch"):
      assert row[side]["reps"] == 2 and row[side]["unit"] == unit
      assert 0 < row[side]["min"] <= row[side]["median"] <= row[side]["max"]
    assert row["ratio"] == pytest.approx(row["jax"]["median"] / row["torch"]["median"])
    assert row["jax"]["compile_s"] > 0
  assert "--predict_export" in results["predict_fps"]["not_measured"]
  traced = {"face_train": "teacher_step", "face_infer": "predict", "audio_train": "audio_step",
            "fusion_train": "<lambda>", "fusion_infer": "<lambda>"}  # each row's jitted step
  for name, step in traced.items():
    trace, = (tmp_path / "profile" / name).glob("plugins/profile/*/*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert f"PjitFunction(jit({step}))" in {e.get("name") for e in events}, name
  markdown = table.read_text()
  assert "| face_train |" in markdown and "Machine:" in done.stdout


def test_quick_host_rows_write_the_documented_json(tmp_path):
  """The first face step from a fresh process (an empty, then the filled compilation cache) and
  the two face pipelines (synthetic; AffectNet + FEC photos prepared into ArrayRecord by the
  project's builders), as the tool writes them (predict_fps: test_predict.py)."""
  rows = ("first_step_cold_s", "first_step_warm_s", "pipeline_synthetic_per_core",
          "pipeline_arrayrecord_per_core")
  out = tmp_path / "bench.json"
  done = subprocess.run(
      [sys.executable, "tools/benchmark.py", "--quick", f"--only={','.join(rows)}", "--peer=off",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  assert tuple(results) == rows
  cold, warm = results["first_step_cold_s"], results["first_step_warm_s"]
  # The warm process loads the step and the state's programs the cold one compiled and cached
  # (the :tiny teacher on 2 AMD Zen 3 cores: 17.9 s cold, 6.3 s warm).
  assert isinstance(cold, float) and 0 < warm < cold
  for name in rows[2:]:
    row = results[name]["jax"]
    assert row["unit"] == "images/s/core" and row["reps"] == 2 and row["threads"] >= 1
    assert 0 < row["min"] <= row["median"] <= row["max"]
  assert "| pipeline_arrayrecord_per_core |" in done.stdout


def test_model_rows_need_no_data_stack():
  """An accelerator machine may have JAX and torch but not Grain, tfds, PyAV or librosa: the model
  rows' modules import none of them (the host rows import them when asked for)."""
  code = ("import sys; from avemo_jax import benchmark, benchmark_torch;"
          "from configs import distill;"
          "print(sorted({'grain', 'tensorflow_datasets', 'av', 'librosa'} & set(sys.modules)))")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=True)
  assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("row", ["fusion_train", "fusion_infer"])
def test_only_the_rows_asked_for_are_compiled_and_timed(row, monkeypatch):
  """--only=X sets up, compiles and times X alone (JAX and the torch peer), not its sibling row
  of the same models (compiling and timing are recorded, not done)."""
  compiled, timed = [], []

  def compile_(fn, *args, donate):
    compiled.append("train" if donate else "infer")
    return None, {}

  def alternate(runs, items, unit, s, trace_as=""):
    timed.append((trace_as, sorted(runs)))
    return {"jax": {}}
  monkeypatch.setattr(benchmark, "_compiled", compile_)
  monkeypatch.setattr(benchmark, "alternate", alternate)
  settings = benchmark.Settings(fusion_batch=2, frames=8)
  results = benchmark.run(distill.get_config("tiny"), settings, (row,))
  assert list(results) == [row]
  assert compiled == [row.split("_")[1]] and timed == [(row, ["jax", "torch"])]


def test_only_the_cold_first_step_runs_one_process(monkeypatch):
  host = pytest.importorskip("avemo_jax.benchmark_host")
  processes = []
  monkeypatch.setattr(host, "first_step_seconds", lambda *args: processes.append(args) or 1.0)
  results = benchmark.run(distill.get_config("tiny"), benchmark.Settings(peer=False),
                          ("first_step_cold_s",))
  assert results == {"first_step_cold_s": 1.0} and len(processes) == 1


def test_unknown_row_is_refused():
  with pytest.raises(ValueError, match="unknown rows.*face_train"):
    benchmark.run(distill.get_config("tiny"), benchmark.Settings(peer=False), ("face_trian",))


def test_kernel_agreement_measures_the_distance_to_the_scan(monkeypatch):
  """fusion_infer's `vs_scan` (a GRU kernel's check on the device): the interpreted Pallas
  kernels agree with the scan to float32 rounding; a kernel 1% off is reported so."""
  features = {"visual": np.ones((2, 5, 3), np.float32), "audio": np.ones((2, 5, 4), np.float32)}
  lengths = np.array([5, 5])
  model = FusionGRU(hidden=8, gru_kernel="pallas_interpret")
  variables = model.init(jax.random.key(0), features, lengths)
  agreement = benchmark.kernel_agreement(model, variables, features, lengths)
  assert agreement["outputs"] < 1e-5 and agreement["gradients"] < 1e-5
  forward = gru_pallas.forward
  monkeypatch.setattr(gru_pallas, "forward", lambda grus, keep, interpret: jax.tree.map(
      lambda x: 1.01 * x, forward(grus, keep, interpret)))
  agreement = benchmark.kernel_agreement(model, variables, features, lengths)
  assert agreement["outputs"] > 1e-3 and agreement["gradients"] > 1e-3
