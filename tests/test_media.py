"""Media decoding and face cropping on real files written by `media_fixtures` (PyAV, soundfile)."""
import fractions
import math
import pickle
import types

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

import media_fixtures as mf
from avemo_jax import predict
from avemo_jax.data import audio_features, faces, media

TONES_HZ = (300, 500, 700, 900)
AMPLITUDE = 0.5
RIGHT_GAIN = 0.5  # mono = mean of channels = (1 + 0.5) / 2 * left
MONO_RMS = (1 + RIGHT_GAIN) / 2 * AMPLITUDE / np.sqrt(2)


def iou(a, b) -> float:
  ax, ay, aw, ah = (float(v) for v in a[:4])
  bx, by, bw, bh = (float(v) for v in b[:4])
  inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
  return inter / (aw * ah + bw * bh - inter)


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
  """4 s, 30 fps, 320x240 H.264, the astronaut's face sliding across; 44.1 kHz stereo AAC tones."""
  path = tmp_path_factory.mktemp("media") / "face.mp4"
  frames = list(mf.moving_face(120))
  audio = mf.stereo(mf.tones(TONES_HZ, 44100, amplitude=AMPLITUDE), RIGHT_GAIN)
  mf.write_video(path, (f for f, _ in frames), 30, audio_CxN=audio)
  return path, [box for _, box in frames]


@pytest.fixture(scope="module")
def wav_48k(tmp_path_factory):
  path = tmp_path_factory.mktemp("media") / "tones.wav"
  mf.write_wav(path, mf.stereo(mf.tones(TONES_HZ[:3], 48000, amplitude=AMPLITUDE), RIGHT_GAIN),
               48000)
  return path


def test_probe(face_video, wav_48k):
  info = media.probe(face_video[0])
  assert (info.has_video, info.fps, info.num_frames, info.width, info.height) == (
    True, 30.0, 120, 320, 240)
  assert (info.has_audio, info.sample_rate, info.channels) == (True, 44100, 2)
  assert (info.rotation, info.video_start_s, info.audio_start_s) == (0, 0.0, 0.0)
  assert info.duration_s == pytest.approx(4.0, abs=0.05)
  info = media.probe(wav_48k)
  assert (info.has_video, info.fps, info.num_frames, info.has_audio) == (False, 0.0, 0, True)
  assert (info.sample_rate, info.channels, info.duration_s) == (48000, 2, 3.0)


@pytest.mark.parametrize("source_fps", [25, 30, 12.5, fractions.Fraction(30000, 1001)])
def test_video_frames_resample_to_25_hz(tmp_path, source_fps):
  num_source = 75
  path = tmp_path / "index.mp4"
  mf.write_video(path, mf.indexed_frames(num_source), source_fps)
  out = list(media.video_frames(path, fps=25.0))
  duration = num_source / source_fps
  assert len(out) == math.floor(duration * 25) + 1  # times 0 .. floor(d * fps) / fps inclusive
  times = np.array([t for t, _ in out])
  np.testing.assert_allclose(times, np.arange(len(out)) / 25.0)
  shown = [mf.read_index(frame) for _, frame in out]
  expected = [min(num_source - 1, math.floor(k * source_fps / 25 + 1e-9)) for k in range(len(out))]
  assert shown == expected  # the latest source frame whose time is <= k / 25
  assert out[0][1].shape == (16, 160, 3) and out[0][1].dtype == np.uint8


def test_video_frames_avec_convention(tmp_path):
  """300 s of video -> 7,501 label frames at 0.00 .. 300.00 s, as the AVEC 2016 label files."""
  path = tmp_path / "long.mp4"
  mf.write_video(path, mf.indexed_frames(300), 1)
  count, last = 0, None
  for t, frame in media.video_frames(path, fps=25.0):
    count, last = count + 1, (t, frame)
  assert count == 7501 and last[0] == pytest.approx(300.0)
  assert mf.read_index(last[1]) == 299


def test_video_frames_content_follows_the_face(face_video):
  path, boxes = face_video
  patch, face_in_patch = mf.face_patch(100)
  for k, (t, frame) in enumerate(media.video_frames(path)):
    source = math.floor(k * 30 / 25 + 1e-9)
    assert mf.read_index(frame) == min(source, 119) and not frame.flags.writeable
    if k in (0, 40, 99):
      x0, y0 = (round(v) for v in boxes[source][:2] - face_in_patch[:2])
      region = frame[y0 + 20:y0 + 80, x0 + 20:x0 + 80].astype(float)
      assert np.abs(region - patch[20:80, 20:80]).mean() < 8  # lossy H.264, same picture


def test_load_audio_from_video(face_video):
  audio = media.load_audio(face_video[0])
  # audio_features.load_audio reads what libsndfile cannot through the same decoder
  np.testing.assert_array_equal(audio_features.load_audio(face_video[0]), audio)
  assert audio.dtype == np.float32 and audio.ndim == 1
  assert abs(len(audio) - 4 * 16000) < 0.05 * 16000  # AAC pads its last frame
  for second, hz in enumerate(TONES_HZ):
    window = audio[second * 16000 + 2000:(second + 1) * 16000 - 2000]
    assert mf.dominant_hz(window, 16000) == pytest.approx(hz, abs=2)
    assert np.sqrt(np.mean(window ** 2)) == pytest.approx(MONO_RMS, rel=0.03)  # lossy AAC
  for second in (1, 2, 3):  # the tone changes at whole seconds: sample 0 is time 0
    before = audio[second * 16000 - 480:second * 16000 - 80]  # 25 ms windows, 5 ms off the change
    after = audio[second * 16000 + 80:second * 16000 + 480]
    assert mf.dominant_hz(before, 16000) == pytest.approx(TONES_HZ[second - 1], abs=40)
    assert mf.dominant_hz(after, 16000) == pytest.approx(TONES_HZ[second], abs=40)


def test_load_audio_wav_matches_audio_features(wav_48k):
  audio = media.load_audio(wav_48k)
  assert len(audio) == 3 * 16000
  np.testing.assert_allclose(audio, audio_features.load_audio(wav_48k), atol=1e-6)
  for second, hz in enumerate(TONES_HZ[:3]):
    window = audio[second * 16000 + 2000:(second + 1) * 16000 - 2000]
    assert mf.dominant_hz(window, 16000) == pytest.approx(hz, abs=2)
    assert np.sqrt(np.mean(window ** 2)) == pytest.approx(MONO_RMS, rel=0.01)


@pytest.mark.parametrize("rate,channels", [(8000, 1), (22050, 6), (44100, 2)])
def test_load_audio_any_rate_and_channel_count(tmp_path, rate, channels):
  mono = mf.tones((440, 880), rate, amplitude=AMPLITUDE)
  path = tmp_path / f"{rate}x{channels}.wav"
  mf.write_wav(path, np.stack([mono] * channels), rate, subtype="FLOAT")
  audio = media.load_audio(path)
  assert len(audio) == 2 * 16000
  assert mf.dominant_hz(audio[2000:14000], 16000) == pytest.approx(440, abs=2)
  assert mf.dominant_hz(audio[18000:30000], 16000) == pytest.approx(880, abs=2)
  rms = np.sqrt(np.mean(audio[2000:14000] ** 2))
  assert rms == pytest.approx(AMPLITUDE / np.sqrt(2), rel=0.01)


def test_bad_media_errors_name_the_file(tmp_path, face_video, wav_48k):
  missing = tmp_path / "missing.mp4"
  for fn in (media.probe, media.load_audio, lambda p: list(media.video_frames(p))):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
      fn(missing)
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).bytes(20000))
  for fn in (media.probe, media.load_audio, lambda p: list(media.video_frames(p))):
    with pytest.raises(ValueError, match="garbage.mp4.*re-download"):
      fn(garbage)
  silent = tmp_path / "silent.mp4"
  mf.write_video(silent, mf.indexed_frames(10), 25)
  with pytest.raises(ValueError, match="silent.mp4: no audio stream"):
    media.load_audio(silent)
  with pytest.raises(ValueError, match="tones.wav: no video stream"):
    next(media.video_frames(wav_48k))
  cut = tmp_path / "cut.mp4"  # moov atom at the end: the header is gone
  cut.write_bytes(face_video[0].read_bytes()[:30000])
  with pytest.raises(ValueError, match="cut.mp4"):
    list(media.video_frames(cut))


def test_truncated_files_are_reported(tmp_path, wav_48k):
  wav = tmp_path / "short.wav"
  wav.write_bytes(wav_48k.read_bytes()[:200000])  # the header still says 3 s
  with pytest.raises(ValueError, match="short.wav.*truncated"):
    media.load_audio(wav)
  path = tmp_path / "faststart.mp4"  # the header comes first and survives the cut
  mf.write_video(path, mf.indexed_frames(100), 25, faststart=True)
  data = path.read_bytes()
  short = tmp_path / "short.mp4"
  short.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="short.mp4.*(truncated|corrupt)"):
    list(media.video_frames(short))


@pytest.fixture(scope="module")
def detector():
  return faces.FaceDetector()


@pytest.fixture(scope="module")
def fast_detector():
  return faces.FaceDetector(min_face=0.3)  # the test videos' faces fill ~40% of the height: faster


def test_detector_finds_real_faces(detector, face_video):
  found = detector.detect(skimage.data.astronaut())
  assert found.shape[1] == 5 and iou(found[0], mf.ASTRONAUT_FACE_BOX) > 0.5
  assert len(detector.detect(mf.background(320, 240))) == 0
  frames = list(mf.moving_face(5))
  for frame, box in frames:
    assert iou(detector.detect(frame)[0], box) > 0.5


def test_detector_tries_rolls_for_tilted_heads(detector):
  turn = cv2.getRotationMatrix2D((256, 256), 25, 1.0)
  tilted = cv2.warpAffine(skimage.data.astronaut(), turn, (512, 512),
                          borderMode=cv2.BORDER_REFLECT)
  x, y, w, h = mf.ASTRONAUT_FACE_BOX
  cx, cy = turn[:, :2] @ (x + w / 2, y + h / 2) + turn[:, 2]
  assert len(faces.FaceDetector(rolls=()).detect(tilted)) == 0
  assert iou(detector.detect(tilted)[0], (cx - w / 2, cy - h / 2, w, h)) > 0.5


def test_detector_pickles(detector):
  clone = pickle.loads(pickle.dumps(detector))
  image = skimage.data.astronaut()
  np.testing.assert_array_equal(clone.detect(image), detector.detect(image))


def test_crop_geometry():
  image = np.arange(100 * 120 * 3, dtype=np.uint8).reshape(100, 120, 3)
  # box 40x30 at (30, 20): side max(40, 30) * (1 + 2 * 0.25) = 60, centre (50, 35):
  # x 20..80, y 5..65
  np.testing.assert_array_equal(faces.crop(image, (30, 20, 40, 30), margin=0.25, size=60),
                                image[5:65, 20:80])
  # near the top-left corner: side 30 at x -5..25, y -5..25, padded by repeating the edge
  out = faces.crop(image, (0, 0, 20, 20), margin=0.25, size=30)
  np.testing.assert_array_equal(out[5:, 5:], image[0:25, 0:25])
  np.testing.assert_array_equal(out[:5, 5:], np.broadcast_to(image[0, 0:25], (5, 25, 3)))
  np.testing.assert_array_equal(out[5:, :5], np.broadcast_to(image[0:25, :1], (25, 5, 3)))
  assert (out[:5, :5] == image[0, 0]).all()
  # Halving a smooth image: close to 2x2 means. Half-pixel box: the square moves by 0.5 px.
  yy, xx = np.mgrid[:100, :120]
  smooth = np.stack([xx, yy, xx + yy], axis=-1).astype(np.uint8)
  small = faces.crop(smooth, (30, 20, 40, 30), margin=0.25, size=30)
  expected = smooth[5:65, 20:80].astype(float).reshape(30, 2, 30, 2, 3).mean(axis=(1, 3))
  assert small.shape == (30, 30, 3) and np.abs(small - expected).max() <= 1
  shifted = faces.crop(smooth, (30.5, 20, 40, 30), margin=0.25, size=60).astype(float)
  np.testing.assert_allclose(shifted[:, 1:-1, 0], smooth[5:65, 21:79, 0] + 0.5, atol=1)
  with pytest.raises(ValueError, match="outside"):
    faces.crop(image, (500, 500, 10, 10), margin=0.1, size=8)


@pytest.fixture(scope="module")
def gaps_video(tmp_path_factory):
  """40 frames at 25 fps; no face in frames 0-4 and 20-29."""
  frames = list(mf.moving_face(40, present=lambda i: 5 <= i < 20 or i >= 30))
  path = tmp_path_factory.mktemp("media") / "gaps.mp4"
  mf.write_video(path, (f for f, _ in frames), 25)
  return path, [box for _, box in frames]


def test_track_carries_boxes_over_missed_frames(gaps_video, fast_detector):
  path, boxes = gaps_video
  out = list(faces.track(media.video_frames(path), fast_detector, margin=0.2, size=64,
                         name=str(path)))
  assert len(out) == 41 and all(o.crop.shape == (64, 64, 3) for o in out)
  detected = [o.detected for o in out]
  assert detected[:5] == [False] * 5 and not any(detected[20:30]) and all(detected[5:20])
  np.testing.assert_array_equal(out[0].box, out[5].box)  # before the first face: the first box
  np.testing.assert_array_equal(out[25].box, out[19].box)  # in a gap: the last box
  assert iou(out[10].box, boxes[10]) > 0.5 and iou(out[35].box, boxes[35]) > 0.5
  np.testing.assert_array_equal(
    out[10].crop, faces.crop(frame_at(path, 10), out[10].box, margin=0.2, size=64))


def test_track_detect_every_and_smooth(gaps_video, fast_detector):
  path = gaps_video[0]
  calls = []
  counting = types.SimpleNamespace(
    detect=lambda frame: calls.append(1) or fast_detector.detect(frame))
  out = list(faces.track(media.video_frames(path), counting, margin=0.2, size=64,
                         detect_every=3, smooth=0.5))
  assert len(calls) == 6 + 12  # every frame until the first face (frame 5), then 6, 9, .., 39
  # A frame not searched takes the last search's result: the gap (20-29) from frame 21 on.
  detected = [o.detected for o in out]
  assert detected[6:] == [detected[k - k % 3] for k in range(6, 41)]
  assert all(detected[5:21]) and not any(detected[21:30]) and all(detected[30:])
  det5, det6 = (fast_detector.detect(frame_at(path, k))[0, :4] for k in (5, 6))
  assert np.abs(det6 - det5).max() > 1  # the face moves
  np.testing.assert_allclose(out[6].box, 0.5 * det5 + 0.5 * det6, atol=1e-4)
  np.testing.assert_array_equal(out[7].box, out[6].box)  # frame 7 not searched: carried


def test_track_from_a_first_pass_box(gaps_video, fast_detector):
  """As predict and prepare_recola run it: a first pass finds the first face on the detection
  grid (frames 0, 3, 6, ..), the track starts from its box and searches on the same grid; a
  frame before the first face is not flagged as detected."""
  path = gaps_video[0]
  box = faces.first_box(media.video_frames(path), fast_detector, every=3)
  np.testing.assert_array_equal(box, fast_detector.detect(frame_at(path, 6))[0, :4])
  out = list(faces.track(media.video_frames(path), fast_detector, margin=0.2, size=64,
                         detect_every=3, box=box))
  has_face = [len(fast_detector.detect(f)) > 0 for _, f in media.video_frames(path)]
  assert [o.detected for o in out] == [has_face[k - k % 3] for k in range(len(out))]
  assert not any(has_face[:5]) and all(has_face[5:20])
  assert all((o.box == box).all() for o in out[:9])  # frames 7 and 8 carry frame 6's box
  no_face = ((k / 25, np.zeros((120, 160, 3), np.uint8)) for k in range(4))
  assert faces.first_box(no_face, fast_detector) is None


def test_portrait_video_frames_come_out_upright(tmp_path, detector):
  """As a phone stores a portrait video: frames turned by +90 degrees, a display matrix that
  turns them back; they come out as a player shows them."""
  upright = [f for f, _ in mf.moving_face(13, width=240, height=320, face_px=110)]
  path = tmp_path / "portrait.mp4"
  mf.write_video(path, (np.rot90(f) for f in upright), 25, rotation=-90)
  info = media.probe(path)
  assert (info.width, info.height, info.rotation) == (240, 320, 270)
  frames = [f for _, f in media.video_frames(path)]
  assert len(frames) == 14 and frames[6].shape == (320, 240, 3)  # 0.52 s: 0 .. 0.52 s
  assert np.abs(frames[6].astype(int) - upright[6]).mean() < 3  # H.264 at crf 18
  assert len(detector.detect(frames[6])) == 1


@pytest.mark.parametrize("video_start_s, audio_start_s", [(1.0, 0.0), (0.0, 0.52)])
def test_sound_is_lined_up_with_the_pictures(tmp_path, video_start_s, audio_start_s):
  """Streams that start at different times: the sound predict uses starts with the first
  picture (silence before a late sound, an early one cut), and a tone that changes every second
  of its own clock changes at those times plus its start after the pictures."""
  path = tmp_path / "late.mp4"
  mf.write_video(path, (f for f, _ in mf.moving_face(50)), 25, audio_rate=16000,
                 audio_CxN=mf.tones(TONES_HZ, 16000)[None], video_start_s=video_start_s,
                 audio_start_s=audio_start_s)
  info = media.probe(path)
  assert info.video_start_s == video_start_s
  waveform, why_not = predict._sound(path, info)
  decoded = media.load_audio(path)
  late = round((info.audio_start_s - video_start_s) * 16000)  # AAC's priming decoded before
  assert why_not is None and len(waveform) == len(decoded) + late
  np.testing.assert_array_equal(waveform[max(late, 0):], decoded[max(-late, 0):])
  assert not waveform[:max(late, 0)].any()
  for second in (1, 2, 3):
    change = round((second + audio_start_s - video_start_s) * 16000)
    if change < 480:
      continue
    before, after = waveform[change - 480:change - 80], waveform[change + 80:change + 480]
    assert mf.dominant_hz(before, 16000) == pytest.approx(TONES_HZ[second - 1], abs=40)
    assert mf.dominant_hz(after, 16000) == pytest.approx(TONES_HZ[second], abs=40)


def frame_at(path, k: int) -> np.ndarray:
  return next(f for i, (_, f) in enumerate(media.video_frames(path)) if i == k)


def test_track_without_any_face_names_the_file(tmp_path, fast_detector):
  path = tmp_path / "empty.mp4"
  mf.write_video(path, (f for f, _ in mf.moving_face(10, present=lambda i: False)), 25)
  with pytest.raises(ValueError, match="empty.mp4: no face found in any of its 11 frames"):
    list(faces.track(media.video_frames(path), fast_detector, margin=0.2, size=64,
                     name=str(path)))
  with pytest.raises(ValueError, match="empty.mp4: no face found in the first 3 frames"):
    list(faces.track(media.video_frames(path), fast_detector, margin=0.2, size=64,
                     name=str(path), max_lead=3))


def test_load_image_reports_bad_files(tmp_path):
  good = tmp_path / "face.jpg"
  Image.fromarray(skimage.data.astronaut()).save(good, quality=90)
  image = faces.load_image(good)
  assert image.shape == (512, 512, 3) and image.dtype == np.uint8
  grey = tmp_path / "grey.png"
  Image.fromarray(skimage.data.camera()).save(grey)
  assert faces.load_image(grey).shape == (512, 512, 3)
  Image.fromarray(skimage.data.camera().astype(np.uint16) * 257).save(grey)  # 16 bits
  assert Image.open(grey).mode == "I;16"
  np.testing.assert_array_equal(faces.load_image(grey)[..., 1], skimage.data.camera())
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(good.read_bytes()[:5000])
  with pytest.raises(ValueError, match="truncated.jpg.*truncated"):
    faces.load_image(truncated)
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  with pytest.raises(ValueError, match="notes.png"):
    faces.load_image(text)
  with pytest.raises(FileNotFoundError, match="nothing.png"):
    faces.load_image(tmp_path / "nothing.png")
