"""Export (issue 6): a `fusion.py:tiny` run (conftest's `tiny_run`) exported by tools/export.py,
each model loaded in a fresh process without the model code and compared with the training-time
model, the export evaluated against the run's summary.json, and ONNX against onnxruntime where
jax2onnx is installed."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from avemo_jax import export, export_eval, exported, predict
from avemo_jax.train import av_stages, build, features, stages
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import load_variables
from configs import audio as audio_configs
from configs import fusion

MODELS = ("teacher", "student", "audio", "fusion/audio", "fusion/visual", "fusion/fused")
SHAPES = ((5, 37), (2, 61))  # (batch, frames), unlike training's and the export's traces
pytestmark = pytest.mark.xdist_group("tiny_run")  # one training run for this and test_predict


def _tool(*args: str) -> str:
  done = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_export_load_evaluate(tiny_run, tmp_path):
  config, workdir, summary = tiny_run
  (workdir / "export" / ".student.old").mkdir(parents=True)  # as an export killed between
  (workdir / "export" / ".student.old" / "manifest.json").write_text("{}")  # its two renames
  # The architectures come from the workdir's config.json (the overrides above included).
  _tool("tools/export.py", f"--workdir={workdir}", f"--out={workdir / 'export'}")
  assert sorted(p.parent.relative_to(workdir / "export").as_posix()
                for p in (workdir / "export").rglob("manifest.json")) == sorted(MODELS)
  assert not list((workdir / "export").rglob(".*"))  # the temporary directories were renamed
  _check_manifests(workdir)
  # Lowered for every platform, the face networks keep both forms of their 1x1 convolutions and
  # max pooling (`layers.every_platform`): the reduce-window is the max pooling of GPUs and TPUs.
  function = jax.export.deserialize(bytearray(
      (workdir / "export" / "student" / exported.FUNCTION).read_bytes()))
  assert function.platforms == export.PLATFORMS
  assert "stablehlo.reduce_window" in function.mlir_module()
  _check_reload(workdir, tmp_path / "reload")
  _check_fresh_process(config, workdir)
  _check_evaluation(workdir, summary, tmp_path / "evaluation")
  _check_onnx(workdir)


def _manifest(workdir, name):
  return json.loads((workdir / "export" / name / "manifest.json").read_text())


def _check_reload(workdir, tmp_path):
  """Loading an export again reuses its compiled function (not its variables) until it changes."""
  copy = shutil.copytree(workdir / "export" / "student", tmp_path)
  first, again = exported.load(copy), exported.load(copy)
  assert again._call is first._call and again.variables is not first.variables
  x = np.zeros((2, 80, 80, 3), np.uint8)
  np.testing.assert_array_equal(first(x)["logits"], again(x)["logits"])
  os.utime(copy / exported.FUNCTION, ns=(0, 0))  # as if written anew
  assert exported.load(copy)._call is not first._call


def _check_manifests(workdir):
  face, fused = _manifest(workdir, "student"), _manifest(workdir, "fusion/fused")
  assert face["inputs"][0]["shape"] == ["b", 80, 80, 3]
  assert [o["name"] for o in face["outputs"]] == ["logits", "feature", "embedding"]
  assert face["preprocessing"]["crop_size"] == 80 and len(face["classes"]) == 8
  with pytest.raises(ValueError, match=r"input 'images' has shape \(1, 64, 64, 3\)"):
    exported.load(workdir / "export" / "student")(np.zeros((1, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match=r"export/audio is an export of kind 'audio'.*'face'"):
    exported.load(workdir / "export" / "audio", "face")
  assert _manifest(workdir, "audio")["preprocessing"]["mel_min_hz"] == 125.0
  assert [(i["name"], i["shape"]) for i in fused["inputs"]] == [
      ("visual", ["b", "t", 16]), ("audio", ["b", "t", 16]), ("lengths", ["b"])]
  fingerprints = fused["preprocessing"]["extractor_fingerprints"]
  assert fingerprints["visual"] == face["source"]["fingerprint"]
  arrays, _ = exported.read_safetensors(workdir / "export/fusion/fused/variables.safetensors")
  with np.load(workdir / "fusion" / "features_train.npz") as f:
    train = {k: f[k] for k in f.files}
  again = {"train": train, "x": {**train, "visual": train["visual"] * 0 + 1}}
  std = features.standardize(again, ("visual",))["x"]["visual"][0, 0]  # (1 - mean) / std
  np.testing.assert_allclose((1 - arrays["standardize/visual/mean"])
                             / arrays["standardize/visual/std"], std, rtol=1e-6)


def _training_model(config, workdir, name):
  """`inputs -> outputs` of the model as training built and restored it (Flax)."""
  size, dims = config.data.image_size, {"visual": config.model.feature_dim,
                                        "audio": config.audio.embed_dim}
  prepare = lambda x: x
  if name in ("teacher", "student"):
    model, stage, example = build.face_model(config.model), config[name], build.face_inputs(size)

    def apply(v, x):  # training feeds uint8 pixels
      logits, aux = model.apply(v, x["images"].astype(np.uint8), train=False)
      return {"logits": logits, **aux}
  elif name == "audio":
    model, stage = build.audio_model(config.audio), config.audio.train
    example = build.audio_inputs()

    def apply(v, x):
      va, aux = model.apply(v, x["mel"])
      return {"valence_arousal": va, **aux}
  else:
    modalities = av_stages.MODEL_MODALITIES[name.split("/")[1]]
    model, stage = build.fusion_model(config.fusion, modalities), config.fusion.train
    example = build.fusion_inputs({m: dims[m] for m in modalities})
    with np.load(workdir / "fusion" / "features_train.npz") as f:
      train = {k: f[k] for k in (*modalities, "labels", "lengths")}
    # Training's own standardisation, with the training features' statistics.
    prepare = lambda x: {**features.standardize({"train": train, "x": x}, modalities)["x"],
                         "lengths": x["lengths"]}
    apply = lambda v, x: {"valence_arousal": model.apply(
        v, {m: x[m] for m in modalities}, x["lengths"])[0]}
  template = jax.eval_shape(lambda: state_lib.create(model, stage, jax.random.key(0), example))
  variables = load_variables(str(workdir / name), template, name)
  apply = jax.jit(apply)
  return lambda x: {k: np.asarray(v) for k, v in apply(variables, prepare(x)).items()}


LOADER = """
import pathlib, sys
import numpy as np
root, batches, names = pathlib.Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
sys.path.insert(0, str(root / names[0]))
import load  # the standalone loader shipped in every export directory
assert "avemo_jax" not in sys.modules and "flax" not in sys.modules, sorted(sys.modules)
from avemo_jax.export import load as package_load
inputs, out = np.load(root.parent / "inputs.npz"), {}
for name in names:
  models = {"standalone": load.load(root / name), "package": package_load(root / name)}
  for tag, model in models.items():
    for b in batches:
      x = {s["name"]: inputs[f"{name}|{b}|{s['name']}"] for s in model.manifest["inputs"]}
      out.update({f"{tag}|{name}|{b}|{k}": np.asarray(v) for k, v in model(**x).items()})
leaked = [m for m in ("flax", "avemo_jax.models", "avemo_jax.train", "orbax") if m in sys.modules]
assert not leaked, leaked
np.savez(root.parent / "outputs.npz", **out)
"""


def _check_fresh_process(config, workdir):
  """Every export, loaded by its load.py and by avemo_jax.export.load in a process that never
  imports the model code, gives the training-time model's outputs on new shapes."""
  inputs, want = {}, {}
  for name in MODELS:
    specs = _manifest(workdir, name)["inputs"]
    reference = _training_model(config, workdir, name)
    for batch, frames in SHAPES:
      x = export.random_inputs(specs, batch=batch, time=frames, seed=batch)
      inputs.update({f"{name}|{batch}|{k}": v for k, v in x.items()})
      want.update({f"{name}|{batch}|{k}": v for k, v in reference(x).items()})
  np.savez(workdir / "inputs.npz", **inputs)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device will do
  batches = ",".join(str(batch) for batch, _ in SHAPES)
  done = subprocess.run(
      [sys.executable, "-c", LOADER, str(workdir / "export"), batches, *MODELS],
      capture_output=True, text=True, env=env, cwd=workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(workdir / "outputs.npz") as got:
    assert len(got.files) == 2 * len(want)
    for key, value in want.items():
      for tag in ("standalone", "package"):
        assert got[f"{tag}|{key}"].shape == value.shape, key
        np.testing.assert_allclose(got[f"{tag}|{key}"], value, atol=1e-5, rtol=0, err_msg=key)


def _check_evaluation(workdir, summary, out):
  """The export's held-out numbers (tools/evaluate.py) equal the run's summary.json."""
  result = export_eval.evaluate(workdir / "export", out)
  for name in ("teacher", "student"):  # the same faces, metric code and argmaxes: equal
    assert {"acc8", "acc7", "macro_f1", "fec_triplet_acc_two_class",
            "confusion"} <= set(result[name])
    assert result[name] == {k: summary[name][k] for k in result[name]}, name
  assert "teacher_agreement" in result["student"]
  close = lambda got, want, tol: all(got[k] == pytest.approx(want[k], abs=tol) for k in got
                                     if not isinstance(got[k], dict))
  assert close(result["audio"], summary["audio"], 1e-5)
  for model, scores in summary["fusion"].items():
    got = result["fusion"][model]
    assert len(got) == 5 and close(got, scores, 1e-5)
    assert list(got["recordings"]) == ["dev_1", "dev_2"]  # what the CCCs cover, per recording
    assert all(close(got["recordings"][r], scores["recordings"][r], 1e-5) for r in got["recordings"])
  for condition, entry in summary["fusion_by_condition"].items():
    for model in summary["fusion"]:
      assert close(result["fusion_by_condition"][condition][model], entry[model], 1e-5)
  assert json.loads((out / "evaluation.json").read_text())["fusion"] == result["fusion"]
  pngs = {p.name for p in out.glob("*.png")}
  assert pngs == {"confusion_teacher.png", "confusion_student.png", "dev_1.png", "dev_2.png"}
  # One model directory, on the run's cached features, through the command-line tool.
  _tool("tools/evaluate.py", f"--export={workdir / 'export/fusion/fused'}",
        f"--out={out / 'cached'}", f"--features_from={workdir}")
  cached = json.loads((out / "cached" / "evaluation.json").read_text())
  assert set(cached) == {"export", "data", "fusion", "fusion_by_condition"}
  assert close(cached["fusion"]["fused"], summary["fusion"]["fused"], 1e-6)


def _check_onnx(workdir):
  """Where jax2onnx is installed, every model converts and onnxruntime agrees with JAX; where
  not, the manifest says so."""
  if not (importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime")):
    assert all(_manifest(workdir, name)["onnx"]["status"].startswith("skipped: jax2onnx")
               for name in MODELS)
    return
  import onnxruntime as ort
  for name in MODELS:
    manifest = _manifest(workdir, name)
    assert manifest["onnx"]["status"] == "converted", (name, manifest["onnx"])
    session = ort.InferenceSession(str(workdir / "export" / name / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = export.random_inputs(manifest["inputs"], batch=4, time=29, seed=7)
    want = exported.load(workdir / "export" / name)(**x)
    outputs = [o["name"] for o in manifest["outputs"]]
    for output, got in zip(outputs, session.run(outputs, x)):
      np.testing.assert_allclose(got, want[output], atol=1e-5, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def fusion_only(tiny_run, tmp_path_factory):
  """(run1, workdir): README's fusion-only run (2 steps, the fused model) on the student and audio
  encoder in run1, a copy of `tiny_run`'s that the tests may take away."""
  _, source, _ = tiny_run
  base = tmp_path_factory.mktemp("fusion_only")
  run1, workdir = base / "run1", base / "ff"
  for stage in ("student", "audio"):
    shutil.copytree(source / stage, run1 / stage)
  # The same extractors and data: the run takes these features after checking their key.
  shutil.copytree(source / "fusion", workdir / "fusion", ignore=lambda d, names: [
      n for n in names if not n.startswith("features_")])
  config = fusion.get_config("tiny")
  config.stages, config.fusion.models, config.fusion.train.num_steps = ("fusion",), ("fused",), 2
  config.student_checkpoint, config.audio_checkpoint = str(run1 / "student"), str(run1 / "audio")
  stages.run(config, workdir)
  return run1, workdir


def test_export_of_a_fusion_only_run_holds_the_models_it_read(tiny_run, fusion_only, tmp_path):
  """The student and audio encoder the run read from run1 are exported from there, their manifests
  say so, and predict.py and evaluate.py find everything they need."""
  _, _, run1_summary = tiny_run
  run1, workdir = fusion_only
  root = tmp_path / "export"
  # A later run in the workdir (here an audio-only config) rewrites WORKDIR/config.json; each
  # stage's own config.json still says what it read.
  latest = (workdir / "config.json").read_text()
  (workdir / "config.json").write_text(audio_configs.get_config("tiny").to_json_best_effort())
  try:
    assert list(export.export_workdir(None, workdir, root, onnx="off")) == [
        "student", "audio", "fusion/fused"]
  finally:
    (workdir / "config.json").write_text(latest)
  fused = exported.load(root / "fusion" / "fused", "fusion")
  assert fused.manifest["source"]["workdir"] == str(workdir.resolve())
  for name, modality in (("student", "visual"), ("audio", "audio")):
    assert json.loads((root / name / "manifest.json").read_text())["source"] == {
        "workdir": str(run1.resolve()), "stage": name, "step": 4,
        "fingerprint": fused.manifest["preprocessing"]["extractor_fingerprints"][modality],
        "read_by": {"workdir": str(workdir.resolve()), "stage": "fusion",
                    "config": f"{name}_checkpoint"}}
  # As predict_video: the face and audio exports beside the fusion one feed it.
  face, audio = predict.face_model(root), exported.load(root / "audio", "audio")
  visual = face(**export.random_inputs(face.manifest["inputs"], batch=3, time=1))["feature"]
  sound = audio(**export.random_inputs(audio.manifest["inputs"], batch=3, time=1))["embedding"]
  va = fused(visual=visual[None], audio=sound[None], lengths=[3])["valence_arousal"]
  assert va.shape == (1, 3, 2) and np.isfinite(va).all()
  result = export_eval.evaluate(root, tmp_path / "evaluation")
  assert result["student"]["acc8"] == run1_summary["student"]["acc8"]
  assert result["audio"]["ccc_valence"] == pytest.approx(run1_summary["audio"]["ccc_valence"],
                                                         abs=1e-5)
  want = json.loads((workdir / "summary.json").read_text())["fusion"]["fused"]
  assert result["fusion"]["fused"]["ccc_valence"] == pytest.approx(want["ccc_valence"], abs=1e-5)
  for name in ("student", "audio"):  # as exported before export.py exported them
    shutil.rmtree(root / name)
  with pytest.raises(FileNotFoundError, match="export/student: no exported model there.*again"):
    predict.face_model(root)
  with pytest.raises(FileNotFoundError, match="fusion models but no student/ or audio/ export"):
    export_eval.evaluate(root, tmp_path / "again")


def test_export_refuses_a_reused_checkpoint_gone_or_changed(tiny_run, fusion_only, tmp_path):
  """The student the run read, taken away or replaced since (by run1's teacher, of the same
  architecture): one error line naming it and the fix, and nothing written."""
  _, source, _ = tiny_run
  run1, workdir = fusion_only
  student, out = run1 / "student", tmp_path / "export"
  student.rename(run1 / "away")
  try:
    done = subprocess.run([sys.executable, "tools/export.py", f"--workdir={workdir}",
                           f"--out={out}"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        f"error: {student} (config.student_checkpoint of {workdir}: its fusion stage read the "
        "student there) holds no checkpoint any more: put that checkpoint back (a relative path "
        f"is taken from the current directory), or rerun the fusion stage in {workdir} on a "
        "student that exists"), done.stderr[-2000:]
    shutil.copytree(source / "teacher" / "checkpoints", student / "checkpoints")
    with pytest.raises(ValueError, match=r"student there\) has changed since: its weights are "
                       r"[0-9a-f]{16}, the run read [0-9a-f]{16}; put that checkpoint back"):
      export.export_workdir(None, workdir, out, onnx="off")
  finally:
    shutil.rmtree(student, ignore_errors=True)
    (run1 / "away").rename(student)
  assert not out.exists()


def test_which_models_a_run_read_from_other_workdirs():
  """As the stages read them: a teacher_checkpoint even beside a "teacher" stage, a student or
  audio checkpoint only when that stage did not run, and only for a stage this workdir trained."""
  config = fusion.get_config("tiny")
  config.teacher_checkpoint, config.student_checkpoint, config.audio_checkpoint = "T", "S", "A"
  trained = {"student": None, "fusion/fused": None}
  for run, want in ((("teacher", "student", "audio", "fusion"), ["teacher"]),
                    (("student",), ["teacher"]), (("fusion",), ["student", "audio"]),
                    (("audio", "fusion"), ["student"]), (("teacher", "audio"), [])):
    config.stages = run
    assert list(export._reused_sources(lambda stage: config, trained)) == want, run
  config.stages = ("fusion",)
  assert export._reused_sources(lambda stage: config, {"student": None}) == {}  # fusion: elsewhere
  config.stages = ("student", "fusion")
  config.teacher_checkpoint = config.audio_checkpoint = ""
  assert export._reused_sources(lambda stage: config, trained) == {}


def _arrays():
  rng = np.random.default_rng(0)
  return {"params/a/kernel": rng.normal(size=(3, 4)).astype(np.float32),
          "batch_stats/b": rng.normal(size=(5,)).astype(np.float64),
          "c": np.arange(7, dtype=np.int32),
          "d": rng.integers(0, 255, (2, 2, 3)).astype(np.uint8), "e": np.float32(2.5)}


def test_safetensors_roundtrip(tmp_path):
  exported.write_safetensors(tmp_path / "v.safetensors", _arrays(), {"format": "np"})
  arrays, metadata = exported.read_safetensors(tmp_path / "v.safetensors")
  assert metadata == {"format": "np"} and arrays.keys() == _arrays().keys()
  for k, v in _arrays().items():
    assert arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v)
  assert exported.unflatten({"a/b/c": 1, "a/d": 2}) == {"a": {"b": {"c": 1}, "d": 2}}
  (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00")
  with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors"):
    exported.read_safetensors(tmp_path / "bad.safetensors")


def test_safetensors_readable_by_the_safetensors_package(tmp_path):
  safetensors = pytest.importorskip("safetensors.numpy")
  exported.write_safetensors(tmp_path / "v.safetensors", _arrays())
  theirs = safetensors.load_file(tmp_path / "v.safetensors")
  assert theirs.keys() == _arrays().keys()
  assert all(np.array_equal(theirs[k], v) for k, v in _arrays().items())


def test_refuses_a_workdir_without_models(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no trained model"):
    export.export_workdir(fusion.get_config("tiny"), tmp_path, tmp_path / "out")
