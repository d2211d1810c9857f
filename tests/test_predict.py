"""Prediction on media (issue 6): exports of one `fusion.py:tiny` run on videos of a real face
(scikit-image's astronaut) written here at odd frame rates, with speech (pysptk's arctic_a0007.wav
when tools/fetch_reference.py has fetched it, else tones) as 44.1 kHz stereo AAC, and without
sound; every prediction is recomputed by calling the exports by hand."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import resampy
import skimage.data
import soundfile as sf
from PIL import Image

import media_fixtures as mf
from avemo_jax import benchmark_common, benchmark_host, export, exported, predict
from avemo_jax.data import audio_features, faces, media

SPEECH = pathlib.Path(__file__).resolve().parent / "reference" / "arctic_a0007.wav"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.xdist_group("tiny_run")  # conftest's tiny_run, trained once


@pytest.fixture(scope="module")
def root(tiny_run) -> pathlib.Path:
  """EXPORT of conftest's tiny run (the numbers need not be good)."""
  _, workdir, _ = tiny_run
  export.export_workdir(None, workdir, workdir / "export_predict", onnx="off")
  return workdir / "export_predict"


def _speech_44k_stereo() -> np.ndarray:
  if SPEECH.is_file():
    speech, rate = sf.read(SPEECH, dtype="float32")
    return mf.stereo(resampy.resample(speech, rate, 44100).astype(np.float32))
  return mf.stereo(mf.tones([220, 330, 440, 550], 44100))


def _read_csv(path) -> np.ndarray:
  lines = path.read_text().splitlines()
  assert lines[0] == "time_s,valence,arousal,face_detected"
  return np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def _by_hand(root, video, fusion_name: str, with_audio: bool):
  """(detected, visual, audio, valence/arousal) from the exports called on whole arrays."""
  student = exported.load(root / "student")
  prep = student.manifest["preprocessing"]
  tracked = list(faces.track(media.video_frames(video, 25), faces.FaceDetector(),
                             margin=prep["crop_margin"], size=prep["crop_size"]))
  visual = np.asarray(student(images=np.stack([f.crop for f in tracked]))["feature"])
  inputs = {"visual": visual[None], "lengths": np.array([len(tracked)], np.int32)}
  audio = None
  if with_audio:
    log_mel = audio_features.log_mel_spectrogram(media.load_audio(video))
    mel = audio_features.examples_at(log_mel, (np.arange(len(tracked)) + 0.5) / 25)
    audio = np.asarray(exported.load(root / "audio")(mel=mel)["embedding"])
    inputs["audio"] = audio[None]
  va = np.asarray(exported.load(root / "fusion" / fusion_name)(**inputs)["valence_arousal"])[0]
  return np.array([f.detected for f in tracked]), visual, audio, va


def _check_rows(rows: np.ndarray, duration_s: float) -> None:
  """One row per 40 ms frame from 0 s to the video's end, all values finite."""
  frames = math.floor(duration_s * 25) + 1
  assert rows.shape == (frames, 4)
  np.testing.assert_allclose(rows[:, 0], np.arange(frames) / 25, atol=1e-9)
  assert np.isfinite(rows).all() and set(np.unique(rows[:, 3])) <= {0.0, 1.0}


def test_talking_face_video(root, tmp_path):
  video, frames = tmp_path / "talk.mp4", 106  # 3.53 s at 30 fps
  mf.write_video(video, (f for f, _ in mf.moving_face(frames)), 30,
                 audio_CxN=_speech_44k_stereo(), audio_rate=44100)
  p = predict.predict_video(root, video, tmp_path / "out", batch=16)
  rows = _read_csv(tmp_path / "out" / "predictions.csv")
  _check_rows(rows, frames / 30)
  assert (tmp_path / "out" / "predictions.png").read_bytes()[:8] == PNG_SIGNATURE
  s = p.summary
  assert s["audio"] == {"used": True, "why_not": None, "starts_after_video_s": 0.0,
                        "seconds_from_first_frame": pytest.approx(
                            media.load_audio(video).size / 16000, abs=1e-3)}
  assert s["note"] is None
  assert [m["name"] for m in s["models"].values()] == ["student", "audio", "fusion/fused"]
  assert s["source"]["fps"] == 30 and s["source"]["sample_rate"] == 44100
  assert s["source"]["channels"] == 2 and s["frames"] == len(rows)
  detected, visual, audio, va = _by_hand(root, video, "fused", with_audio=True)
  np.testing.assert_array_equal(p.detected, detected)
  assert s["frames_without_face"] == (rows[:, 3] == 0).sum() == (~detected).sum()
  np.testing.assert_allclose(p.visual, visual, atol=1e-5, rtol=0)
  np.testing.assert_allclose(p.audio, audio, atol=1e-5, rtol=0)
  # The hand computation runs the extractors on whole arrays, predict in batches of 16: XLA's CPU
  # matrix products round differently per batch size, and the GRU carries the ~1e-6 feature
  # differences over the frames (seen: 1.06e-5 at frame 42 of 178).
  np.testing.assert_allclose(p.valence_arousal, va, atol=5e-5, rtol=0)
  np.testing.assert_allclose(rows[:, 1:3], va, atol=5e-5, rtol=0)
  assert np.ptp(va, axis=0).min() > 1e-3  # the predictions follow the frames


def test_benchmark_times_videos_after_the_first_without_reloading(root, tmp_path):
  video = tmp_path / "short.mp4"
  mf.write_video(video, (f for f, _ in mf.moving_face(50)), 25)  # 2 s, silent
  loaded = exported._function.cache_info()
  row = benchmark_host.predict_row(benchmark_common.Settings(
      reps=2, warmup=1, predict_export=str(root), predict_video=str(video)))["jax"]
  assert row["frames"] == 51 and row["reps"] == 2 and row["unit"] == "frames/s"
  assert row["min"] > 0 and row["first_call_s"] > 0
  now = exported._function.cache_info()  # 2 models (student, fusion/visual) a call, 3 calls
  assert now.hits - loaded.hits >= 4 and now.misses - loaded.misses <= 2


def test_silent_video_through_the_command_line(root, tmp_path):
  """No sound track at 24 fps, the face missing from every 10th source frame. The tool keeps
  what it compiles in the main job's cache, ~/.cache/avemo_jax/xla (HOME here: tmp_path)."""
  video, frames = tmp_path / "silent.mp4", 60
  mf.write_video(video, (f for f, _ in mf.moving_face(frames, present=lambda i: i % 10 != 3)), 24)
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env["HOME"] = str(tmp_path)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # :tiny's compile in < 1 s when idle
  done = subprocess.run(
      [sys.executable, "tools/predict.py", f"--export={root}", f"--video={video}",
       f"--out={tmp_path / 'out'}"], capture_output=True, text=True, env=env,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert done.returncode == 0, done.stderr[-3000:]
  assert list((tmp_path / ".cache" / "avemo_jax" / "xla").glob("jit_call-*-cache"))
  assert "NOTE: no audio used: the video has no audio track" in done.stdout
  rows = _read_csv(tmp_path / "out" / "predictions.csv")
  _check_rows(rows, frames / 24)
  s = json.loads((tmp_path / "out" / "predictions.json").read_text())
  assert s["audio"]["used"] is False and "no audio track" in s["note"]
  assert s["models"]["fusion"]["name"] == "fusion/visual" and s["models"]["audio"] is None
  assert s["frames_without_face"] == (rows[:, 3] == 0).sum() > 0
  detected, _, _, va = _by_hand(root, video, "visual", with_audio=False)
  np.testing.assert_array_equal(rows[:, 3] == 1, detected)
  np.testing.assert_allclose(rows[:, 1:3], va, atol=5e-5, rtol=0)  # as above


def test_images(root, tmp_path):
  face_image, no_face = tmp_path / "astronaut.png", tmp_path / "coffee.jpg"
  Image.fromarray(skimage.data.astronaut()).save(face_image)
  Image.fromarray(mf.background(320, 240)).save(no_face)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(no_face.read_bytes()[:300])
  *results, unread = predict.predict_images(root, [face_image, no_face, broken], tmp_path / "out")
  student = exported.load(root / "student")
  prep, classes = student.manifest["preprocessing"], student.manifest["classes"]
  image = faces.load_image(face_image)
  box = faces.FaceDetector().detect(image)[0, :4]
  crop = faces.crop(image, box, margin=prep["crop_margin"], size=prep["crop_size"])
  want = {k: np.asarray(v)[0] for k, v in student(images=crop[None]).items()}
  face, other = results
  assert face["face_detected"] and face["note"] is None and face["model"] == "student"
  assert list(face["probabilities"]) == classes
  for r in results:
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    assert len(r["feature"]) == student.manifest["outputs"][1]["shape"][1]  # 128 beyond :tiny
  np.testing.assert_allclose(face["feature"], want["feature"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(face["embedding"], want["embedding"], atol=1e-5, rtol=0)
  e = np.exp(want["logits"] - want["logits"].max())
  np.testing.assert_allclose(list(face["probabilities"].values()), e / e.sum(), atol=1e-6)
  # Mostly inside the hand-labelled face box of the astronaut.
  x, y, w, h = face["box"]
  bx, by, bw, bh = mf.ASTRONAUT_FACE_BOX
  assert abs(x + w / 2 - bx - bw / 2) < bw / 4 and abs(y + h / 2 - by - bh / 2) < bh / 4
  assert not other["face_detected"] and "no face detected" in other["note"]
  assert (tmp_path / "out" / "astronaut.json").is_file()
  assert (tmp_path / "out" / "coffee.json").is_file()
  assert set(unread) == {"image", "model", "error"}
  assert "broken.jpg: cannot decode" in unread["error"]
  assert json.loads((tmp_path / "out" / "broken.json").read_text()) == unread
  # What tools/predict.py --image prints: the 3 most likely expressions of each, then the note.
  lines = predict.image_report(results + [unread]).splitlines()
  assert lines[0].split() == ["image", "face", "top", "expressions", "(student)"]
  best = sorted(face["probabilities"], key=face["probabilities"].get, reverse=True)[:3]
  assert lines[1].split() == ["astronaut.png", "yes"] + [
      word for c in best for word in (c, f"{face['probabilities'][c]:.3f}")]
  assert lines[2].split()[:2] == ["coffee.jpg", "NO"] and len(lines[2].split()) == 8
  assert lines[3].split() == ["broken.jpg", "-", "ERROR:", "unreadable,", "left", "out"]
  assert lines[4:] == [f"NOTE: {no_face}: {other['note']}", f"ERROR: {unread['error']}"]
  with pytest.raises(ValueError, match="no readable image: .*broken.jpg"):
    predict.predict_images(root, [broken])
  with pytest.raises(ValueError, match=f"{no_face}: no face found"):
    predict.predict_images(root, [no_face], require_face=True)
  teacher = predict.predict_images(root, [face_image], face_model_name="teacher")[0]
  assert teacher["model"] == "teacher"


def test_refusals(root, tmp_path):
  """The wrong kind of export, a missing export, a model directory for a video, unreadable or
  face-free media: each error names the culprit."""
  image = tmp_path / "face.png"
  Image.fromarray(skimage.data.astronaut()).save(image)
  with pytest.raises(ValueError, match="kind 'audio'.*a 'face' model is needed"):
    predict.predict_images(root / "audio", [image])
  with pytest.raises(FileNotFoundError, match=r"nowhere/student: no exported model.*tools/export"):
    predict.predict_images(tmp_path / "nowhere", [image])
  video = tmp_path / "empty.mp4"
  mf.write_video(video, (mf.background(160, 120) for _ in range(12)), 25)
  with pytest.raises(ValueError, match="one exported model"):
    predict.predict_video(root / "student", video)
  with pytest.raises(ValueError, match="need detect_every >= 1.* got 0"):
    predict.predict_video(root, video, detect_every=0)
  with pytest.raises(ValueError, match=f"{video}: no face found in any of its"):
    predict.predict_video(root, video)
  broken = tmp_path / "broken.mp4"
  broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
  with pytest.raises(ValueError, match=f"{broken}: FFmpeg cannot read"):
    predict.predict_video(root, broken)
