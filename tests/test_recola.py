"""RECOLA (AVEC 2016 layout) and unlabelled-face builders on fixtures written here: prepare, read
back through tfds data sources and Grain, and check crops, labels, audio alignment and reports."""
import json
import math
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest
import skimage.data
from PIL import Image

import media_fixtures as mf
import recola_fixtures as rf
from avemo_jax.data import (audio_features, faces, media, recola, recola_files, tfds_common,
                            unlabelled)
from avemo_jax.train import features

SIZE, MARGIN = 48, 0.1
FAST = dict(min_face=0.3, rolls=())  # the fixtures' faces fill 40% of the frame height
ROOT = pathlib.Path(__file__).resolve().parent.parent
LATIN1 = (os.fsdecode(b"c/caf\xe9.bmp"), "c/caf\\xe9.bmp")  # an old zip's file name; as stored
NAMES = {"train": ["train_1", "train_2"], "dev": ["dev_1"]}


@pytest.fixture(scope="module")
def recola_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("recola")
  truth = rf.write_recola(root / "manual")
  report, fresh = recola.prepare(root / "manual", root / "data", image_size=SIZE, margin=MARGIN,
                                 num_workers=2, detector_options=FAST)  # the process pool path
  assert fresh
  return root, truth, report


def iou(a, b) -> float:
  ax, ay, aw, ah = (float(v) for v in a[:4])
  bx, by, bw, bh = (float(v) for v in b[:4])
  inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
  return inter / (aw * ah + bw * bh - inter)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float32) - b).mean())


def test_recola_report(recola_data):
  root, truth, report = recola_data
  train, dev = report["train"], report["dev"]
  assert [r["name"] for r in train["recordings"]] == NAMES["train"]
  assert [(r["frames"], r["first"], r["label_rows"]) for r in train["recordings"]] == [
      (251, 0, 251), (201, 251, 203)]
  assert train["frames"] == 452 and train["skipped"] == {}
  assert [r["carried"] for r in train["recordings"]] == [0, 0]
  assert train["recordings"][0]["notes"] == ["audio: last 0.040 s zero-padded"]  # 10 s: 250 * 40
  assert train["recordings"][1]["notes"] == ["audio: 0.060 s after the last frame dropped",
                                             "labels: last 2 rows dropped (after the video's end)"]
  assert "48000 Hz, 2 channel" in train["recordings"][0]["audio"]
  assert dev["skipped"] == {"no face in the video": 1, "unreadable video": 1}
  assert "recordings_video/dev_2.mp4: no face found" in dev["examples"]["no face in the video"][0]
  assert "recordings_video/dev_3.mp4" in dev["examples"]["unreadable video"][0]
  assert "truncated" in dev["examples"]["unreadable video"][0]
  assert not list((root / "data").glob("recola_spill_*"))  # the workers' files are gone
  dev_1 = truth["dev_1"]
  no_face = sum(dev_1.boxes[dev_1.source_frame(k)] is None for k in range(151))
  assert no_face == 13 + 38 and dev["recordings"][0]["carried"] == no_face
  assert report["settings"]["detector"]["min_face"] == 0.3
  text = recola.format_report(report)
  assert "dev: 1 recordings written (151 frames, 51 without a detected face" in text
  assert "skipped 1  no face in the video" in text and "dev_2.mp4" in text
  again, fresh = recola.prepare(root / "manual", root / "data", image_size=SIZE, margin=MARGIN)
  assert not fresh and again["train"] == train


def test_recola_read_back_through_grain(recola_data):
  root, truth, _ = recola_data
  for split, names in NAMES.items():
    recordings = recola.source(root / "data", split, image_size=SIZE, margin=MARGIN)
    assert len(recordings) == len(names) and recordings.names == names
    for r, name in enumerate(names):
      rec, tr = recordings[r], truth[name]
      frames = len(rec.labels)
      assert rec.name == name and rec.labels.shape == (frames, 2)
      assert rec.labels.dtype == np.float32 and rec.audio.dtype == np.float32
      np.testing.assert_allclose(rec.labels[:, 0], tr.valence[:frames], atol=1e-6)
      np.testing.assert_allclose(rec.labels[:, 1], tr.arousal[:frames], atol=1e-6)
      assert rec.audio.shape == (frames * 640,)
      wav = root / "manual" / "recordings_audio" / f"{name}.wav"
      heard = min(frames, math.floor(media.probe(wav).duration_s * 25 + 1e-6))
      for k in range(heard):  # window k holds the tone written at k * 40 ms .. (k + 1) * 40 ms
        assert mf.dominant_hz(rec.audio[640 * k:640 * (k + 1)], 16000) == rf.tone_hz(k), (name, k)
      if heard < frames:
        assert not rec.audio[640 * heard:].any()  # zero-padded
      present = [tr.boxes[tr.source_frame(k)] is not None for k in range(frames)]
      np.testing.assert_array_equal(rec.detected, present)
      ds = (grain.MapDataset.range(frames).map(lambda t, r=r: recordings.frame(r, t))
            .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
      video = root / "manual" / "recordings_video" / f"{name}.mp4"
      last = next(k for k in range(frames) if present[k])  # before the first face: its box
      previous = None
      for t, (crop, (_, frame)) in enumerate(zip(ds, media.video_frames(video))):
        assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
        box = rec.boxes[t]
        own = _mad(crop, faces.crop(frame, box, margin=MARGIN, size=SIZE))  # JPEG q95 at 48 px
        assert own < 6, (name, t)
        if present[t] and t and tr.source_frame(t) != tr.source_frame(t - 1):  # the face jumped
          assert _mad(crop, faces.crop(previous, box, margin=MARGIN, size=SIZE)) > 4 * own
        previous = frame
        if present[t]:  # the box is the face of this frame's source frame, not a neighbour's
          src = tr.source_frame(t)
          near = [s for s in range(src - 2, src + 3) if 0 <= s < len(tr.boxes) and tr.boxes[s]
                  is not None]
          assert max(near, key=lambda s: iou(box, tr.boxes[s])) == src, (name, t)
          assert iou(box, tr.boxes[src]) > 0.6
          last = t
        else:  # no face: the last detected face's box is carried
          np.testing.assert_array_equal(box, rec.boxes[last])
      assert t == frames - 1


def test_recola_stored_order(recola_data):
  root, _, report = recola_data
  config = tfds_common.crop_config(SIZE, MARGIN)
  records = tfds_common.data_source(recola.Recola, config, "train", root / "data", "")
  assert len(records) == 452
  ds = grain.MapDataset.source(records)
  order = [(int(ds[i]["recording"]), int(ds[i]["frame"])) for i in range(0, 452, 50)]
  assert order == [(0, t) for t in range(0, 251, 50)] + [(1, t - 251) for t in range(300, 452, 50)]
  with pytest.raises(IndexError, match="frame 251 out of range for train_1"):
    recola.source(root / "data", "train", image_size=SIZE, margin=MARGIN).frame(0, 251)
  with pytest.raises(FileNotFoundError, match="prepare_recola.py .*--image_size=64"):
    recola.source(root / "data", "train", image_size=64)


def test_recola_clips_are_the_fusion_stage_windows(recola_data):
  root, _, _ = recola_data
  recordings = recola.source(root / "data", "train", image_size=SIZE, margin=MARGIN)
  clips = recola.clips(root / "data", "train", stride=5, image_size=SIZE, margin=MARGIN)
  assert len(clips) == 51 + 41 and recola.CLIP_SAMPLES == 15600
  ds = grain.MapDataset.source(clips)
  for r, offset in ((0, 0), (1, 51)):
    rec = recordings[r]
    log_mel = audio_features.log_mel_spectrogram(rec.audio)
    padded = np.pad(rec.audio, (7520, 15600))
    for i in (0, 1, 20, 25, 40):
      t = 5 * i
      item = ds[offset + i]
      assert item["audio"].shape == (15600,) and item["audio"].dtype == np.float32
      np.testing.assert_array_equal(item["labels"], rec.labels[t])
      np.testing.assert_array_equal(item["audio"], padded[640 * t:640 * t + 15600])
      if 12 <= t < len(rec.labels) - 14:  # inside the recording: exactly the fusion stage's input
        mel = audio_features.waveform_to_examples(item["audio"], 16000)
        np.testing.assert_allclose(mel, audio_features.examples_at(log_mel, [(t + 0.5) / 25]),
                                   atol=1e-4)
  assert recola.clip_start(0) == -7520 and recola.clip_start(3) == 3 * 640 - 7520
  copy = pickle.loads(pickle.dumps(clips))  # Grain worker processes get pickled sources
  np.testing.assert_array_equal(copy[60]["audio"], clips[60]["audio"])
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(recordings)).frame(1, 5),
                                recordings.frame(1, 5))


def test_recola_feeds_the_fusion_feature_extraction(recola_data, tmp_path):
  """Also: the prepared variant's fingerprint (in the fusion stage's feature cache key) is
  another one after another preparation (here: its metadata changed)."""
  root, _, _ = recola_data
  print_of = lambda data: recola.fingerprint(data, image_size=SIZE, margin=MARGIN)
  again = shutil.copytree(root / "data", tmp_path / "data")
  assert print_of(again) == print_of(root / "data") != print_of(tmp_path / "nothing")
  meta = next(again.rglob("metadata.json"))
  meta.write_text(meta.read_text() + " ")
  assert print_of(again) != print_of(root / "data")
  recordings = recola.source(root / "data", "train", image_size=SIZE, margin=MARGIN)
  out = features.extract(recordings, face_fn=lambda x: x.mean(axis=(1, 2)),
                         audio_fn=lambda m: m.mean(axis=1), batch=64)
  np.testing.assert_array_equal(out["lengths"], [251, 201])
  assert out["visual"].shape == (2, 251, 3) and out["audio"].shape == (2, 251, 64)
  np.testing.assert_array_equal(out["labels"][1, :201], recordings[1].labels)
  np.testing.assert_allclose(out["visual"][0, 7], recordings.frame(0, 7).mean(axis=(0, 1)),
                             rtol=1e-5)


def _copy(manual: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
  shutil.copytree(manual, to)
  return to


def test_an_interrupted_preparation_resumes_from_its_finished_recordings(
    recola_data, tmp_path, monkeypatch):
  """Killed while a dev recording is processed, the same command again processes only the
  recordings not finished (the skipped ones are found again) and writes what one run writes."""
  root, _, report = recola_data
  processed, real = [], recola.process

  def process(job, crash_at=None):
    processed.append(job.checked.files.name)
    if job.checked.files.name == crash_at:
      raise KeyboardInterrupt  # as the user's Ctrl-C
    return real(job)

  data = tmp_path / "data"
  monkeypatch.setattr(recola, "process", lambda job: process(job, crash_at="dev_1"))
  with pytest.raises(KeyboardInterrupt):
    recola.prepare(root / "manual", data, image_size=SIZE, margin=MARGIN, detector_options=FAST)
  assert processed == ["train_1", "train_2", "dev_1"]
  spill, = data.iterdir()  # the finished recordings; not tfds's empty folders
  assert spill.name.startswith("recola_spill_")
  assert sorted(p.name for p in spill.glob("*.json")) == ["train_1.json", "train_2.json"]
  processed.clear()
  monkeypatch.setattr(recola, "process", process)
  killed = data / "recola" / "48px_margin0.1" / "incomplete.ABC123_1.0.0"  # as SIGKILL leaves it
  killed.mkdir(parents=True)
  (killed / "recola-train.array_record-00000-of-00001").write_bytes(b"x" * 1000)
  resumed, fresh = recola.prepare(root / "manual", data, image_size=SIZE, margin=MARGIN,
                                  detector_options=FAST)
  assert fresh and processed == ["dev_1", "dev_2", "dev_3"] and not list(data.glob("recola_*"))
  assert not killed.exists()
  drop_time = lambda r: [{k: v for k, v in x.items() if k not in ("frames_per_s", "seconds")}
                         for x in r["recordings"]]
  for split in ("train", "dev"):
    assert drop_time(resumed[split]) == drop_time(report[split])
    assert resumed[split]["skipped"] == report[split]["skipped"]
    ours = recola.source(data, split, image_size=SIZE, margin=MARGIN)
    theirs = recola.source(root / "data", split, image_size=SIZE, margin=MARGIN)
    for r in range(len(theirs)):
      for field in ("labels", "audio", "detected", "boxes"):
        np.testing.assert_array_equal(getattr(ours[r], field), getattr(theirs[r], field))
      np.testing.assert_array_equal(ours.frame(r, 7), theirs.frame(r, 7))


def test_recola_bad_inputs_fail_before_any_decoding(recola_data, tmp_path):
  root, truth, _ = recola_data
  manual = _copy(root / "manual", tmp_path / "manual")
  gold = manual / "ratings_gold_standard"
  values = np.zeros(251 + 40, np.float32)  # 11.6 s of labels for a 10 s video
  rf.write_arff(gold / "valence" / "train_1.arff", "train_1", "valence", values)
  rf.write_arff(gold / "arousal" / "train_1.arff", "train_1", "arousal", values)
  times = np.arange(151) * 0.04
  times[100] = 4.04  # row 101 repeats a step
  rf.write_arff(gold / "valence" / "dev_1.arff", "dev_1", "valence", truth["dev_1"].valence,
                times=times)
  rf.write_arff(gold / "arousal" / "train_2.arff", "train_2", "arousal",
                truth["train_2"].arousal[:-1])
  (manual / "recordings_audio" / "dev_2.wav").unlink()
  with pytest.raises(ValueError) as error:
    recola.prepare(manual, tmp_path / "data", image_size=SIZE, margin=MARGIN)
  message = str(error.value)
  assert "5 problem(s)" in message and "nothing was prepared" in message
  assert "recordings_video/train_1.mp4 gives 251 frames at 25 Hz (300 at 30 fps) but " \
         f"{gold}/valence/train_1.arff has 291 rows" in message
  assert "recordings_audio/train_1.wav lasts 10.00 s but " \
         f"{gold}/valence/train_1.arff has 291 rows (11.64 s)" in message
  assert f"{gold}/valence/dev_1.arff line 109 (data row 101): frameTime 4.04 after 3.96, " \
         "expected 4.00" in message
  assert f"{gold}/valence/train_2.arff has 203 rows but {gold}/arousal/train_2.arff has 202" \
         in message
  assert f"dev_2: missing {manual}/recordings_audio/dev_2.wav" in message
  assert not (tmp_path / "data" / "recola" / "48px_margin0.1" / "1.0.0").exists()


def test_gold_standard_parsing(tmp_path):
  path = tmp_path / "dev_9.arff"
  path.write_bytes(b"% exported\r\n@RELATION GOLDSTANDARD_VALENCE\r\n@attribute Instance_name "
                   b"string\r\n@attribute frameTime numeric\r\n@ATTRIBUTE GoldStandard numeric\r\n"
                   b"@data\r\n\"dev_9\",0.00,0.5\r\ndev_9, 0.04 ,-0.25\r\n")
  times, values = recola_files.read_gold_standard(path)
  np.testing.assert_allclose(times, [0, 0.04])
  np.testing.assert_array_equal(values, [0.5, -0.25])
  head = "@relation x\n@attribute Instance_name string\n@attribute frameTime numeric\n"
  cases = {
      head + "@data\n'a',0,1\n": r"line 4: the header declares \['instance_name', 'frametime'\]"
                                 r", without \['goldstandard'\]",
      head + "@attribute GoldStandard numeric\n@data\n'a',0,?\n": "line 6: frameTime or "
                                                                   "GoldStandard is not a number",
      head + "@attribute GoldStandard numeric\n@data\n'a',0\n": "line 6: 2 values where the "
                                                                "header declares 3",
      head + "@attribute GoldStandard numeric\n@data\n'a',0.04,1\n": r"line 6 \(data row 1\): "
                                                                     "frameTime 0.04, expected "
                                                                     "0.00",
      "Instance_name,frameTime,GoldStandard\n": "line 1: expected @relation, @attribute or @data",
      head + "@attribute GoldStandard numeric\n@data\n": "no data rows",
      head + "@attribute GoldStandard numeric\n@data\n'train_7',0,1\n": "line 6: Instance_name "
                                                                       "'train_7' is another "
                                                                       "recording's",
  }
  for text, error in cases.items():
    path.write_text(text)
    with pytest.raises(ValueError, match=f"dev_9.arff.*{error}"):
      recola_files.read_gold_standard(path)


def _tool(*args: str) -> str:
  done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=180)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_prepare_recola_tool(tmp_path):
  manual = tmp_path / "manual"
  rf.write_recording(manual, "train_3", seconds=2, fps=25, wav_rate=16000, wav_channels=1)
  rf.write_recording(manual, "dev_4", seconds=2, fps=25, wav_rate=16000, wav_channels=1)
  out = _tool("tools/prepare_recola.py", f"--manual_dir={manual}", f"--data_dir={tmp_path}",
              "--image_size=32", "--num_workers=0", "--detect_every=2", "--min_face=0.3",
              "--rolls=")
  assert "\nPrepared:\n" in out and "train: 1 recordings written (51 frames" in out
  assert "dev_4: 51 frames (0 carried)" in out and '"detect_every": 2' in out
  meta = json.loads((tmp_path / "recola" / "32px_margin0.1" / "1.0.0" / "metadata.json")
                    .read_text())
  assert meta["dev"]["recordings"][0]["name"] == "dev_4"


@pytest.fixture(scope="module")
def unlabelled_data(tmp_path_factory):
  """Images with known faces in nested folders, one under a name that is not UTF-8, a photo
  without a face, a 2x3000 banner, two broken files."""
  root = tmp_path_factory.mktemp("unlabelled")
  folder = root / "faces"
  (folder / "a" / "b").mkdir(parents=True)
  (folder / "c").mkdir()
  truth = {}
  Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpg", quality=92)
  truth["astronaut.jpg"] = mf.ASTRONAUT_FACE_BOX
  frame, box = list(rf.face_frames(4))[3]
  Image.fromarray(frame).save(folder / "a" / "b" / "frame.PNG")
  truth["a/b/frame.PNG"] = box
  two = mf.background(400, 300)
  big, big_box = mf.face_patch(160)
  small, _ = mf.face_patch(90)
  two[60:220, 20:180], two[30:120, 290:380] = big, small
  Image.fromarray(two).save(folder / "c" / "two.webp", lossless=True)
  truth["c/two.webp"] = big_box + np.array([20, 60, 0, 0])  # the largest face is cropped
  Image.fromarray(mf.face_patch(120)[0]).save(folder / "c" / "close.bmp")
  truth["c/close.bmp"] = mf.face_patch(120)[1]
  shutil.copy(folder / "c" / "close.bmp", folder / LATIN1[0])
  truth[LATIN1[1]] = mf.face_patch(120)[1]
  Image.fromarray(mf.background(3000, 2)).save(folder / "banner.png")  # no face fits
  Image.fromarray(mf.background(200, 150)).save(folder / "coffee.jpeg")
  (folder / "broken.jpg").write_bytes((folder / "astronaut.jpg").read_bytes()[:3000])
  (folder / "a" / "notes.png").write_text("not an image")
  (folder / "readme.txt").write_text("ignored")
  report, fresh = unlabelled.prepare(folder, root / "data", image_size=SIZE, margin=0.2,
                                     detector_options=dict(rolls=()))
  assert fresh
  return root, truth, report


def test_unlabelled_faces(unlabelled_data):
  root, truth, report = unlabelled_data
  r = report["train"]
  assert (r["images"], r["written"]) == (9, 5)
  assert r["skipped"] == {"unreadable image": 2, "no face found": 2}
  assert any("broken.jpg" in e for e in r["examples"]["unreadable image"])
  assert any("notes.png" in e for e in r["examples"]["unreadable image"])
  assert {"banner.png", "coffee.jpeg"} == {pathlib.Path(e.split(":")[0]).name
                                           for e in r["examples"]["no face found"]}
  assert "written 5, skipped 4" in unlabelled.format_report(report)
  faces_ds = grain.MapDataset.source(unlabelled.source(root / "data", image_size=SIZE, margin=0.2))
  records = tfds_common.data_source(unlabelled.UnlabelledFaces, tfds_common.crop_config(SIZE, 0.2),
                                    "train", root / "data", "")
  assert len(faces_ds) == len(records) == 5
  seen = {}
  for i in range(5):
    image, record = faces_ds[i]["image"], records[i]
    file = record["file"].decode()
    seen[file] = int(record["num_faces"])
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert iou(record["box"], truth[file]) > 0.5, file
    photo = faces.load_image(root / "faces" / (LATIN1[0] if file == LATIN1[1] else file))
    assert _mad(image, faces.crop(photo, record["box"], margin=0.2, size=SIZE)) < 6  # JPEG
  assert set(seen) == set(truth) and seen["c/two.webp"] == 2


def test_prepare_unlabelled_tool(unlabelled_data, tmp_path):
  root, _, _ = unlabelled_data
  out = _tool("tools/prepare_unlabelled.py", f"--manual_dir={root / 'faces'}",
              f"--data_dir={tmp_path}", "--image_size=24", "--num_workers=2", "--rolls=")
  assert "\nPrepared:\n" in out and "9 image files): written 5, skipped 4" in out
  assert "no face found" in out and "coffee.jpeg" in out
  with pytest.raises(FileNotFoundError, match="no image files"):
    unlabelled.prepare(tmp_path, tmp_path / "data2")
