"""End to end on prepared real-format data: AffectNet, FEC, unlabelled faces and RECOLA fixtures
written here in the official layouts, prepared by the builders, then `configs/fusion.py:tiny`
(teacher -> student -> audio -> fusion) with --config.data.source=tfds."""
import json

import numpy as np
from PIL import Image

import media_fixtures as mf
import official_fixtures
import recola_fixtures as rf
from avemo_jax.data import affectnet, fec, recola, unlabelled
from avemo_jax.train import stages
from configs import fusion

MARGIN = 0.1
FAST = dict(min_face=0.3, rolls=())  # the fixtures' faces fill 40% of the frame height


def _prepare_all(root, size: int):
  data = root / "prepared"
  official_fixtures.write_affectnet(root / "affectnet")
  official_fixtures.write_fec(root / "fec")
  faces = root / "faces"
  faces.mkdir()
  for i, side in enumerate((90, 110, 130, 150)):
    Image.fromarray(mf.face_patch(side)[0]).save(faces / f"face_{i}.jpg", quality=92)
  for name, phase in (("train_1", 0.0), ("train_2", 1.0), ("dev_1", 2.0), ("dev_2", 3.0)):
    rf.write_recording(root / "recola", name, seconds=6, fps=25, wav_rate=44100, wav_channels=2,
                       phase=phase)
  reports = {
      "affectnet": affectnet.prepare(root / "affectnet", data, image_size=size, margin=MARGIN)[0],
      "fec": fec.prepare(root / "fec", data, image_size=size, margin=MARGIN)[0],
      "unlabelled": unlabelled.prepare(faces, data, image_size=size, margin=MARGIN,
                                       detector_options=dict(rolls=()))[0],
      "recola": recola.prepare(root / "recola", data, image_size=size, margin=MARGIN,
                               detector_options=FAST)[0],
  }
  return data, reports


def test_tiny_teacher_student_fusion_on_prepared_fixtures(tmp_path, caplog):
  config = fusion.get_config("tiny")
  data, _ = _prepare_all(tmp_path, config.data.image_size)
  config.data.source, config.data.data_dir, config.data.crop_margin = "tfds", str(data), MARGIN
  workdir = tmp_path / "run"
  summary = stages.run(config, workdir)
  # Of the fixtures' 3 dev recordings one was skipped when prepared: CCCs of the other two.
  assert "the dev CCCs cover 2 of RECOLA's 9 dev recordings" in caplog.text

  assert set(summary) >= {"teacher", "student", "audio", "fusion", "fusion_by_condition"}
  for stage in ("teacher", "student"):
    assert 0.0 <= summary[stage]["acc8"] <= 1.0 and 0.0 <= summary[stage]["fec_triplet_acc"] <= 1.0
    # every AffectNet validation face and FEC test triplet of the fixtures was evaluated
    confusion = np.asarray(summary[stage]["confusion"])
    assert confusion.sum() == len(affectnet.source(data, "test", image_size=80, margin=MARGIN))
  for model in ("audio", "visual", "fused"):
    entry = summary["fusion"][model]
    assert all(np.isfinite(entry[k]) and -1 <= entry[k] <= 1
               for k in ("ccc_valence", "ccc_arousal", "ccc_valence_mean", "ccc_arousal_mean"))
  assert set(summary["fusion_by_condition"]) == {"both present", "face not detected"}
  with np.load(workdir / "fusion" / "features_train.npz") as f:
    # two 6 s recordings: 151 label frames each (frameTime 0.00 .. 6.00)
    assert f["visual"].shape == (2, 151, 16) and list(f["lengths"]) == [151, 151]
    labels = recola.source(data, "train", image_size=80, margin=MARGIN)[1].labels
    np.testing.assert_allclose(f["labels"][1], labels)
  plots = {p.name for p in (workdir / "fusion" / "plots").glob("*.png")}
  assert plots == {f"{r}.png" for r in summary["fusion"]["fused"]["recordings"]} and len(plots) == 2
  assert not (workdir / "sample_faces.png").exists()  # the synthetic grid is for synthetic data
  assert json.loads((workdir / "summary.json").read_text())["fusion"] == summary["fusion"]
