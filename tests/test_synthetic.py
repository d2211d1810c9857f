"""The embedded synthetic data: determinism, shapes, label semantics and a learnable signal."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from avemo_jax.data import synthetic as syn

SIZE = 64  # small images keep the structural tests fast; the probe below uses the real size


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _odd_one_out(expression_3xK: np.ndarray) -> int:
  e = expression_3xK.astype(np.float64)
  d01, d02, d12 = (np.linalg.norm(e[i] - e[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
  return int(2 - np.argmin([d01, d02, d12]))


def test_expression_space_constants():
  k = len(syn.ACTIONS)
  assert syn.NUM_CLASSES == len(syn.EXPRESSIONS) == 8
  assert syn.PROTOTYPES.shape == (8, k) and syn.PROTOTYPES.dtype == np.float32
  assert syn.VALENCE_AROUSAL.shape == (8, 2)
  assert not syn.PROTOTYPES[0].any()  # Neutral
  gaps = np.linalg.norm(syn.PROTOTYPES[:, None] - syn.PROTOTYPES[None], axis=-1)
  assert gaps[~np.eye(8, dtype=bool)].min() > 0.8  # every pair differs in several actions


def test_valence_arousal_of_prototypes():
  for c in range(syn.NUM_CLASSES):
    va = syn.valence_arousal(syn.PROTOTYPES[c])
    assert va.shape == (2,) and np.all(np.abs(va) <= 1)
    np.testing.assert_allclose(va, syn.VALENCE_AROUSAL[c], atol=0.25)


def test_expression_for_valence_arousal_is_continuous():
  np.testing.assert_allclose(syn.expression_for_valence_arousal(0.0, 0.0), 0.0, atol=1e-6)
  angles = np.linspace(0, 2 * np.pi, 2001)
  path = [syn.expression_for_valence_arousal(0.8 * np.cos(t), 0.8 * np.sin(t)) for t in angles]
  path = np.stack(path)
  assert path.shape == (2001, len(syn.ACTIONS))
  steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
  step_va = 0.8 * (angles[1] - angles[0])
  assert steps.max() < 40 * step_va  # bounded slope: small V/A change -> small change
  assert np.linalg.norm(path[0] - path[1000]) > 1.0  # but the face does change along the way
  for c in range(1, syn.NUM_CLASSES):  # each class's own V/A gives (nearly) its prototype
    e = syn.expression_for_valence_arousal(*syn.VALENCE_AROUSAL[c])
    assert np.argmin(np.linalg.norm(syn.PROTOTYPES - e, axis=1)) == c


def test_render_face_shapes_and_nuisance():
  person = syn.random_identity(np.random.default_rng(0))
  expression = syn.PROTOTYPES[1]
  a = syn.render_face(expression, person, np.random.default_rng(1), size=SIZE)
  b = syn.render_face(expression, person, np.random.default_rng(1), size=SIZE)
  c = syn.render_face(expression, person, np.random.default_rng(2), size=SIZE)
  assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8 and a.flags["C_CONTIGUOUS"]
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 2  # pose / lighting / noise differ
  assert a.std() > 20
  assert syn.render_face(expression, person, np.random.default_rng(1)).shape == (140, 140, 3)


def test_faces_items_are_deterministic_and_well_formed():
  ds = syn.SyntheticFaces(20, seed=3, split="train", size=SIZE)
  assert len(ds) == 20
  ex = ds[5]
  assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.uint8
  assert ex["label"].dtype == np.int32 and 0 <= ex["label"] < syn.NUM_CLASSES
  assert ex["clean_label"].dtype == np.int32
  assert ex["valence"].dtype == ex["arousal"].dtype == np.float32
  assert ex["expression"].shape == (len(syn.ACTIONS),) and ex["expression"].dtype == np.float32
  np.testing.assert_allclose([ex["valence"], ex["arousal"]], syn.valence_arousal(ex["expression"]))
  assert _same(ex, ds[5])
  forward = [ds[i] for i in range(20)]
  fresh = syn.SyntheticFaces(20, seed=3, split="train", size=SIZE)
  backward = [fresh[i] for i in reversed(range(20))][::-1]
  assert all(_same(x, y) for x, y in zip(forward, backward))
  with ThreadPoolExecutor(4) as pool:  # grain reads from several threads
    threaded = list(pool.map(fresh.__getitem__, range(20)))
  assert all(_same(x, y) for x, y in zip(forward, threaded))
  other = syn.SyntheticFaces(20, seed=4, split="train", size=SIZE)[5]
  assert not np.array_equal(ex["image"], other["image"])
  with pytest.raises(IndexError):
    ds[20]
  with pytest.raises(ValueError, match="train"):
    syn.SyntheticFaces(4, seed=0, split="validation")


def test_label_noise_rate():
  noisy = syn.SyntheticFaces(400, seed=0, size=16, label_noise=0.3)
  clean = syn.SyntheticFaces(400, seed=0, size=16)
  items = [noisy[i] for i in range(400)]
  flipped = np.mean([ex["label"] != ex["clean_label"] for ex in items])
  assert abs(flipped - 0.3) < 0.07
  for i in range(5):  # the noise changes labels only
    ref = clean[i]
    assert ref["label"] == ref["clean_label"] == items[i]["clean_label"]
    np.testing.assert_array_equal(ref["image"], items[i]["image"])
  counts = np.bincount([ex["clean_label"] for ex in items], minlength=8)
  assert counts.min() > 25  # every class is drawn


def test_triplets():
  ds = syn.SyntheticTriplets(150, seed=0, size=16, annotator_noise=0.0)
  items = [ds[i] for i in range(150)]
  ex = items[0]
  assert ex["images"].shape == (3, 16, 16, 3) and ex["images"].dtype == np.uint8
  assert ex["expression"].shape == (3, len(syn.ACTIONS))
  assert ex["label"].dtype == ex["triplet_type"].dtype == np.int32
  assert {int(x["triplet_type"]) for x in items} == {0, 1, 2}
  assert {int(x["label"]) for x in items} == {0, 1, 2}
  assert all(x["label"] == _odd_one_out(x["expression"]) for x in items)
  noisy = syn.SyntheticTriplets(150, seed=0, size=16, annotator_noise=0.3)
  agree = np.mean([noisy[i]["label"] == _odd_one_out(items[i]["expression"]) for i in range(150)])
  assert 0.6 < agree < 1.0  # annotators disagree sometimes, but the majority mostly holds
  assert _same(ds[7], items[7])
  with pytest.raises(IndexError):
    ds[150]


def test_unlabelled():
  ds = syn.SyntheticUnlabelled(10, seed=0, size=SIZE)
  ex = ds[3]
  assert set(ex) == {"image"} and ex["image"].shape == (SIZE, SIZE, 3)
  assert _same(ex, ds[3])
  assert not np.array_equal(ex["image"], ds[4]["image"])


def test_sample_grid(tmp_path):
  path = tmp_path / "grid.png"
  syn.save_sample_grid(path, seed=0, size=SIZE, per_class=3)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  pixels = matplotlib.image.imread(path)
  assert pixels.shape[0] > 400 and pixels[..., :3].std() > 0.1
  # Drawn once: the same grid again (a restarted run) leaves the file; another one replaces it.
  drawn = path.stat().st_mtime_ns
  syn.save_sample_grid(path, seed=0, size=SIZE, per_class=3)
  assert path.stat().st_mtime_ns == drawn
  syn.save_sample_grid(path, seed=1, size=SIZE, per_class=3)
  assert path.stat().st_mtime_ns != drawn and not np.array_equal(
      matplotlib.image.imread(path), pixels)
  path.write_bytes(b"not a png")
  syn.save_sample_grid(path, seed=0, size=SIZE, per_class=3)
  np.testing.assert_array_equal(matplotlib.image.imread(path), pixels)


@pytest.fixture(scope="module")
def probe_data():
  """Grey 14x14 (10x10 mean-pooled) pixels of 800 train and 400 held-out-identity test faces."""
  def load(split: str, n: int):
    ds = syn.SyntheticFaces(n, seed=0, split=split)  # the real 140 px
    items = [ds[i] for i in range(n)]
    grey = np.stack([ex["image"].mean(-1) for ex in items])
    x = grey.reshape(n, 14, 10, 14, 10).mean((2, 4)).reshape(n, -1)
    return x, np.array([ex["clean_label"] for ex in items]), {int(ex["identity"]) for ex in items}
  return load("train", 800), load("test", 400)


def test_identities_are_disjoint_between_splits(probe_data):
  (_, _, train_ids), (_, _, test_ids) = probe_data
  assert len(train_ids) > 700 and not train_ids & test_ids


def test_linear_probe_learns_expressions(probe_data):
  """A ridge-regression (linear) classifier on raw pixels beats chance (0.125) by far."""
  (x_tr, y_tr, _), (x_te, y_te, _) = probe_data
  mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
  x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
  targets = np.eye(syn.NUM_CLASSES)[y_tr]
  w = np.linalg.solve(x_tr.T @ x_tr + 10.0 * np.eye(x_tr.shape[1]), x_tr.T @ (targets - 0.125))
  accuracy = np.mean((x_te @ w).argmax(1) == y_te)
  print(f"linear probe test accuracy: {accuracy:.3f}")
  assert accuracy >= 0.4, accuracy
