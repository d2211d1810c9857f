"""Weight import: our trunk and VGGish against facenet-pytorch 2.6 and torchvggish 0.2 with the
same random weights, the convert tools, and the configs' pretrained starts (config.init).

The torch references are the packages' own model files, found in tests/reference/ (see
tools/fetch_reference.py) or installed (`pip install facenet-pytorch==2.6.0 torchvggish==0.2
--no-deps`); those tests skip without torch or without them. The config tests need neither.
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avemo_jax.models import audio, convert, inception_resnet
from avemo_jax.train import build, loop
from avemo_jax.train import state as state_lib
from avemo_jax.train import stages
from configs import audio as audio_config
from configs import teacher as teacher_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = 1e-4  # max abs difference, float32
STEM = ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b")
TRUNK = STEM + ("repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8")


def _source(dist: str, member: str) -> pathlib.Path:
  """A reference package's source file: tests/reference/<name> or the installed distribution."""
  path = ROOT / "tests" / "reference" / pathlib.Path(member).name
  if not path.is_file():
    try:
      path = pathlib.Path(importlib.metadata.distribution(dist).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
      pass
  if not path.is_file():
    pytest.skip(f"{dist}'s {member} not found: run `python tools/fetch_reference.py` or "
                f"`pip install {dist} --no-deps`")
  return path


def _load(path: pathlib.Path, name: str) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def facenet_torch():
  """facenet-pytorch's InceptionResnetV1 (with logits, like the VGGFace2 file), BatchNorm
  statistics of real activations and random affine parameters; its features on random input."""
  torch = pytest.importorskip("torch")
  path = _source("facenet-pytorch", "facenet_pytorch/models/inception_resnet_v1.py")
  # Its package __init__ imports MTCNN (torchvision); the model file needs only a download
  # helper, stubbed: nothing is downloaded.
  helper = types.ModuleType("_facenet.utils.download")
  helper.download_url_to_file = None
  sys.modules.update({"_facenet": types.ModuleType("_facenet"),
                      "_facenet.utils": types.ModuleType("_facenet.utils"),
                      "_facenet.utils.download": helper})
  sys.modules["_facenet"].__path__ = []
  torch.manual_seed(0)
  net = _load(path, "_facenet.inception_resnet_v1").InceptionResnetV1(classify=True,
                                                                       num_classes=16)
  batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in batch_norms:
      bn.momentum = None  # running statistics = those of the calibration batch
    net.train()(torch.randn(8, 3, 140, 140))
    for bn in batch_norms:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.1)
    x = torch.randn(2, 3, 140, 140)
    features, h = {}, x
    net.eval()
    for name in TRUNK:
      h = getattr(net, name)(h)
      features[name] = h.permute(0, 2, 3, 1).numpy()
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  return net.state_dict(), state_dict, x.permute(0, 2, 3, 1).numpy(), features


@pytest.fixture(scope="module")
def vggish_torch():
  """torchvggish 0.2's VGG (no PCA post-processing), He-initialised so that the embedding is
  O(1) (torch's default init leaves it near 0), and its embeddings of random log-mel patches."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = _load(_source("torchvggish", "torchvggish/torchvggish.py"), "_torchvggish")._vgg(False)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        m.bias.normal_(0.0, 0.1)
    x = torch.randn(3, 1, audio.NUM_FRAMES, audio.NUM_BANDS)
    embedding = net.eval()(x).numpy()
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  return net.state_dict(), state_dict, x[:, 0].numpy(), embedding


def test_facenet_tool_features_match_torch(facenet_torch, tmp_path):
  """tools/convert_facenet.py as a user runs it, then our trunk on its output."""
  tensors, state_dict, x, want = facenet_torch
  torch = pytest.importorskip("torch")
  torch.save(tensors, tmp_path / "facenet.pt")
  run = subprocess.run([sys.executable, "tools/convert_facenet.py", "--cut=block8",
                        f"--input={tmp_path / 'facenet.pt'}", f"--output={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  variables, info = convert.load(tmp_path / "out", "facenet", "test")
  assert json.loads(run.stdout) == info
  assert info["sha256"] == hashlib.sha256((tmp_path / "facenet.pt").read_bytes()).hexdigest()
  assert info["model"] == {"cut": "block8", "width": 1.0, "depth": [5, 10, 5]}
  assert info["torch_keys"] == len(state_dict) and info["parameters"]["params"] == 22_564_096
  assert info["ignored_keys"] == {"last_linear": 1, "last_bn": 4, "logits": 2,
                                  "num_batches_tracked": 112}
  model = inception_resnet.InceptionResnetV1(cut="block8")
  out, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  for name, got in (("mixed_7a", aux["mixed_7a"]), ("block8", out)):
    assert got.shape == want[name].shape == (2, 3, 3, 1792)
    assert np.abs(want[name]).max() > 5  # not a check of near-zero activations
    np.testing.assert_allclose(got, want[name], rtol=0, atol=TOL, err_msg=name)


def test_facenet_cut_ignores_the_rest_and_names_mismatches(facenet_torch):
  _, state_dict, _, _ = facenet_torch
  variables = convert.facenet_from_torch(state_dict)  # cut mixed_7a
  assert set(variables["params"]) == set(STEM + TRUNK[7:11]) - {"maxpool_3a"}
  np.testing.assert_array_equal(variables["params"]["repeat_2"]["block_9"]["branch1_2"]["conv"][
      "kernel"], state_dict["repeat_2.9.branch1.2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["mixed_7a"]["branch2_1"]["bn"]["var"],
                                state_dict["mixed_7a.branch2.1.bn.running_var"])
  with pytest.raises(ValueError, match=r"(?s)465 shapes differ, 0 missing, 0 unexpected\. .*"
                     r"width=0\.25.*conv2d_1a\.conv\.weight -> params/conv2d_1a/conv/kernel "
                     r"is \(3, 3, 3, 32\), the model has \(3, 3, 3, 8\)") as error:
    convert.facenet_from_torch(state_dict, inception_resnet.InceptionResnetV1(width=0.25))
  lines = str(error.value).splitlines()  # the counts, 10 shapes (params first), the rest counted
  assert len(lines) == 12 and "params/" in lines[10] and lines[11] == "  ... and 455 more"
  broken = {k: v for k, v in state_dict.items() if k != "mixed_6a.branch0.bn.running_var"}
  broken["mixed_7a.branch4.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"(?s)missing: batch_stats/mixed_6a/branch0/bn/var .*"
                     r"unexpected: mixed_7a\.branch4\.weight -> params/mixed_7a/branch4/kernel"):
    convert.facenet_from_torch(broken)


def test_vggish_tool_embedding_matches_torch(vggish_torch, tmp_path):
  """The VGGish tool's function (in this process: its 290 MB once less through the disk) on a
  file with torchvggish master's PCA parameters too, then our VGGish on its output."""
  tensors, state_dict, x, want = vggish_torch
  torch = pytest.importorskip("torch")
  pca = {"pproc.pca_matrix": torch.eye(128), "pproc.pca_means": torch.zeros(128, 1)}
  torch.save({**tensors, **pca}, tmp_path / "vggish.pth")
  info = convert.convert_file("vggish", tmp_path / "vggish.pth", tmp_path / "out")
  variables, saved = convert.load(tmp_path / "out", "vggish", "test")
  assert saved == info and info["torch_keys"] == 20 and info["ignored_keys"] == {"pproc": 2}
  assert info["parameters"] == {"params": 72_141_184} and "va_head" not in variables["params"]
  variables["params"]["va_head"] = {"kernel": jnp.zeros((128, 2)), "bias": jnp.zeros(2)}
  _, aux = jax.jit(audio.VGGish().apply)(variables, x)
  assert np.abs(want).max() > 1 and (want > 0).mean() > 0.2
  np.testing.assert_allclose(aux["embedding"], want, rtol=0, atol=TOL)
  with pytest.raises(FileExistsError, match="choose another output"):
    convert.convert_file("vggish", tmp_path / "vggish.pth", tmp_path / "out")
  with pytest.raises(ValueError, match=r"features\.0\.weight -> params/conv1/kernel is "
                     r"\(3, 3, 1, 64\), the model has \(3, 3, 1, 8\)"):
    convert.vggish_from_torch(state_dict, audio.VGGish(width=0.125, fc_dim=64, embed_dim=16))


def _truncated(torch, path: pathlib.Path, **save) -> None:
  torch.save({"fc.weight": torch.zeros(64, 64)}, path, **save)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


_FILES = r"facenet-pytorch's 20180402-114759-vggface2\.pt .* torchvggish's vggish-10086976\.pth"
_PCA = (r"torchvggish's PCA parameters file .* reads the network weights, "
        r"vggish-10086976\.pth, not PCA")
_PCA_NUMPY = {"pca_eigen_vectors": np.eye(4, dtype=np.float32), "pca_means": np.zeros(4)}
_LEGACY = {"_use_new_zipfile_serialization": False}  # torch < 1.6 wrote pickles, not a zip
_BAD_FILES = {  # file name: (write it with torch, error, message)
    "weights": (lambda torch, p: p.mkdir(), ValueError, "is a folder: give the weights file"),
    "none.pt": (lambda torch, p: None, FileNotFoundError, f"not found: give .*{_FILES}"),
    "cut.pt": (_truncated, ValueError, "not a complete torch state dict .*: re-download it"),
    "cut_legacy.pth": (lambda torch, p: _truncated(torch, p, **_LEGACY), ValueError,
                       "not a complete torch state dict .*: re-download it"),
    "vggish_model.ckpt": (lambda torch, p: p.write_bytes(b"\0\0\x1e\0vggish/conv1/biases"),
                          ValueError, f"is a TensorFlow checkpoint, .* convert {_FILES}"),
    # raw floats: the first byte may look like a pickle's
    "model.ckpt.data-00000-of-00001": (lambda torch, p: p.write_bytes(b"\x80" * 64), ValueError,
                                       "is a TensorFlow checkpoint"),
    "page.pth": (lambda torch, p: p.write_text("<html>404</html>"), ValueError,
                 f"not a torch file .*: re-download it; TensorFlow checkpoints are not "
                 f"supported.*{_FILES}"),
    "vggish_pca_params-970ea276.pth": (lambda torch, p: torch.save(_PCA_NUMPY, p), ValueError,
                                       f"holds NumPy arrays, not tensors: it looks like {_PCA}"),
    "pca_legacy.pth": (lambda torch, p: torch.save(_PCA_NUMPY, p, **_LEGACY), ValueError,
                       f"holds NumPy arrays, not tensors: it looks like {_PCA}"),
    "module.pt": (lambda torch, p: torch.save(torch.nn.Linear(2, 2), p), ValueError,
                  r"holds objects other than tensors, .* save model\.state_dict\(\) instead"),
    "list.pt": (lambda torch, p: torch.save([torch.zeros(2)], p), ValueError,
                r"holds a list, not a state dict .* save model\.state_dict\(\)"),
    "run.pt": (lambda torch, p: torch.save({"net": {"w": torch.zeros(2)}, "epoch": 3}, p),
               ValueError, r"run\.pt is not a state dict: 2 of its 2 entries are not tensors "
               r"\('net' \(dict\), 'epoch' \(int\)\): give"),
    "wrapped.pt": (lambda torch, p: torch.save(
        {"state_dict": {f"w{i}": i for i in range(12)} | {"b": torch.zeros(2)}}, p), ValueError,
                   r"wrapped\.pt\['state_dict'\] is not a state dict: 12 of its 13 entries are "
                   r"not tensors \('w0' \(int\), .*'w9' \(int\), \.\.\. and 2 more\)"),
}


@pytest.mark.parametrize("name", list(_BAD_FILES))
def test_read_torch_names_the_file_and_the_fix(tmp_path, name):
  """Each file a user may give by mistake: one error (cli.run prints it) naming it and the fix."""
  torch = pytest.importorskip("torch")
  write, error, message = _BAD_FILES[name]
  write(torch, tmp_path / name)
  with pytest.raises(error, match=message) as raised:
    convert.read_torch(tmp_path / name)
  assert str(raised.value).startswith(str(tmp_path / name))


@pytest.mark.parametrize("entry, prefix", [("state_dict", ""), ("model", "module."),
                                           ("state_dict", "_orig_mod.module.")])
def test_read_torch_unwraps_a_training_checkpoint(tmp_path, entry, prefix):
  """A checkpoint's weights entry, the keys of a DataParallel or compiled model unprefixed."""
  torch = pytest.importorskip("torch")
  weights = {"fc.weight": torch.arange(6.0).reshape(2, 3),
             "bn.num_batches_tracked": torch.tensor(7)}
  torch.save({entry: {prefix + k: v for k, v in weights.items()}, "epoch": 3,
              "optimizer": {"state": {}}}, tmp_path / "run.pt")
  got = convert.read_torch(tmp_path / "run.pt")
  assert got.keys() == weights.keys() and got["bn.num_batches_tracked"] == 7
  np.testing.assert_array_equal(got["fc.weight"], np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("source, kind, message", [
    ("facenet_torch", "vggish", r"it has 0 of the model's 18 weight arrays; its keys look like "
     r"facenet-pytorch's InceptionResnetV1 \(conv2d_1a\.\*\): convert it with "
     r"tools/convert_facenet\.py$"),
    ("vggish_torch", "facenet", r"it has 0 of the model's 465 weight arrays; its keys look like "
     r"torchvggish's VGGish \(features\.\*, embeddings\.\*\): convert it with "
     r"tools/convert_vggish\.py$"),
    (_PCA_NUMPY, "vggish", f"its keys look like {_PCA}"),
    ({f"layer{i}.weight": np.zeros(2) for i in range(12)}, "facenet",
     r"look like neither facenet-pytorch's nor torchvggish's \(top-level names: "
     rf"layer0\.\* \(1\), .*layer9\.\* \(1\), \.\.\. and 2 more\): give {_FILES}"),
], ids=["facenet-to-vggish", "vggish-to-facenet", "pca-to-vggish", "unknown-to-facenet"])
def test_other_models_file_names_its_converter(request, source, kind, message):
  """Another model's keys: which model they are from, not a size fix and hundreds of lines."""
  state_dict = request.getfixturevalue(source)[1] if isinstance(source, str) else source
  with pytest.raises(ValueError, match=message) as raised:
    getattr(convert, f"{kind}_from_torch")(state_dict)
  assert "\n" not in str(raised.value) and "width" not in str(raised.value)


class _Started(Exception):
  """Raised by the patched loop with the state a stage would start training from."""


@pytest.fixture
def patched_loop(monkeypatch):
  """The loop stops before the first step, with the state it made; no sample-face picture is
  drawn."""
  def train(stage, *args):
    raise _Started(stage.name, stage.init())
  monkeypatch.setattr(loop, "train", train)
  monkeypatch.setattr(stages.synthetic, "save_sample_grid", lambda *args, **kwargs: None)


def _save(directory: pathlib.Path, kind: str, variables) -> str:
  convert.save(directory, jax.tree.map(np.asarray, variables), {"kind": kind, "model": {}})
  return str(directory)


def _perturbed(variables, seed: int):
  """Different from any fresh initialisation (BatchNorm statistics included)."""
  leaves, treedef = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([rng.uniform(0.5, 1.5, x.shape).astype(np.float32) for x in leaves])


@pytest.mark.usefixtures("patched_loop")
def test_teacher_starts_from_converted_trunk(tmp_path):
  config = teacher_config.get_config("tiny")
  m = config.model
  trunk = inception_resnet.InceptionResnetV1(cut=m.cut, width=m.width, depth=tuple(m.depth))
  size = config.data.image_size
  want = _perturbed(jax.eval_shape(lambda: trunk.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)), seed=1)
  config.init.face_backbone = _save(tmp_path / "trunk", "facenet", want)
  with pytest.raises(_Started) as info:
    stages.run(config, tmp_path / "run")
  name, state = info.value.args
  assert name == "teacher" and set(state.params) == {"trunk", "head", "embedding", "logits"}
  got = {"params": state.params["trunk"], "batch_stats": state.batch_stats["trunk"]}
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.usefixtures("patched_loop")
def test_audio_stage_starts_from_converted_vggish(tmp_path):
  config = audio_config.get_config("tiny")
  a = config.audio
  model = audio.VGGish(width=a.width, fc_dim=a.fc_dim, embed_dim=a.embed_dim)
  want = _perturbed(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, audio.NUM_FRAMES, audio.NUM_BANDS)))), seed=2)
  va_head = want["params"].pop("va_head")
  config.init.audio = _save(tmp_path / "vggish", "vggish", want)
  with pytest.raises(_Started) as info:
    stages.run(config, tmp_path / "run")
  _, state = info.value.args
  assert jax.tree.structure(state.params["va_head"]) == jax.tree.structure(va_head)
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in state.params.items()
                                               if k != "va_head"}, want["params"])


def test_full_size_trunk_refused_on_tiny_config(tmp_path):
  full = jax.eval_shape(lambda: inception_resnet.InceptionResnetV1().init(
      jax.random.key(0), jnp.zeros((1, 80, 80, 3)), train=False))
  path = _save(tmp_path / "full", "facenet",
               jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), full))
  config = teacher_config.get_config("tiny")
  model = build.face_model(config.model)
  state = jax.eval_shape(lambda: state_lib.create(model, config.teacher, jax.random.key(0),
                                                  build.face_inputs(config.data.image_size)))
  with pytest.raises(ValueError, match=r"(?s)config\.init\.face_backbone=.* does not fit the "
                     r"model: \d+ shapes differ, 0 missing, \d+ unexpected\. .*set "
                     r"config\.model to match.*shape: params/trunk/conv2d_1a/conv/kernel is "
                     r"\(3, 3, 3, 32\), the model has \(3, 3, 3, 8\)\n.*\.\.\. and \d+ more\n"
                     r"  unexpected: params/trunk/repeat_1/block_1/.*\.\.\. and \d+ more$"):
    state_lib.start_from(state, path, "facenet", at=("trunk",), what="config.init.face_backbone",
                         section="config.model")
  with pytest.raises(ValueError, match=r"config\.init\.audio=.* holds 'facenet' weights, not "
                     r"'vggish'"):
    convert.load(path, "vggish", "config.init.audio")
  with pytest.raises(FileNotFoundError, match=r"tools/convert_vggish\.py --output="):
    convert.load(tmp_path / "none", "vggish", "config.init.audio")
