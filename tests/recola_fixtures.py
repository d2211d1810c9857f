"""Small RECOLA inputs in the AVEC 2016 release layout, with known faces, labels and tones.

Gold-standard ARFFs follow the release's form (`@relation GOLDSTANDARD_AROUSAL`, attributes
Instance_name string / frameTime numeric / GoldStandard numeric, `@data`, one row per 40 ms);
videos are real H.264 `.mp4` files with an AAC track, in which the astronaut's face jumps to a new
place in every source frame (so that a crop's box tells which frame it came from); `.wav` files
hold tones that change every 0.4 s (10 label frames), at various rates and channel counts.
"""
import dataclasses
import pathlib
from typing import Callable

import numpy as np

import media_fixtures as mf

WIDTH, HEIGHT, FACE_PX = 320, 240, 96
SEGMENT_S = 0.4  # the tone changes every 10 label frames
TONES_HZ = (400, 700, 1000, 1300, 1600, 1900)  # multiples of 25 Hz: exact bins of a 640-sample FFT


@dataclasses.dataclass
class Truth:
  """What a recording holds: per source frame the face box (x, y, w, h) or None."""
  name: str
  fps: float
  boxes: list
  valence: np.ndarray  # float32 [rows] as written
  arousal: np.ndarray

  def source_frame(self, k: int) -> int:
    """The source frame on screen at label frame k (k * 0.04 s)."""
    return min(int(np.floor(k * self.fps / 25 + 1e-9)), len(self.boxes) - 1)


def tone_hz(k: int) -> int:
  """The tone of label frame k."""
  return TONES_HZ[int(k // round(SEGMENT_S * 25)) % len(TONES_HZ)]


def tones(seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
  """float32 [seconds * rate]: phase-continuous sines following `tone_hz`."""
  frame = np.arange(round(seconds * rate)) * 25 // rate
  hz = np.asarray(TONES_HZ, np.float64)[frame // round(SEGMENT_S * 25) % len(TONES_HZ)]
  return (amplitude * np.sin(2 * np.pi * np.cumsum(hz) / rate)).astype(np.float32)


def face_frames(num_frames: int, present: Callable[[int], bool] = lambda i: True):
  """Yields (frame_HxWx3, box or None): the face at a new place in every frame, index stamped."""
  bg = mf.background(WIDTH, HEIGHT)
  patch, box = mf.face_patch(FACE_PX)
  for i in range(num_frames):
    frame = bg.copy()
    face = None
    if present(i):
      x = 4 + (67 * i) % (WIDTH - FACE_PX - 8)
      y = mf.BIT_H + 4 + (41 * i) % (HEIGHT - FACE_PX - mf.BIT_H - 8)
      frame[y:y + FACE_PX, x:x + FACE_PX] = patch
      face = box + np.array([x, y, 0, 0], np.float32)
    mf.stamp_index(frame, i)
    yield frame, face


def gold(rows: int, phase: float) -> tuple[np.ndarray, np.ndarray]:
  """Valence and arousal of rows 0..rows-1 (a known function of time), rounded as written."""
  t = np.arange(rows) * 0.04
  valence = np.round(0.6 * np.sin(2 * np.pi * t / 4 + phase), 6)
  arousal = np.round(0.4 * np.cos(2 * np.pi * t / 3 + phase) + 0.1, 6)
  return valence.astype(np.float32), arousal.astype(np.float32)


def write_arff(path: pathlib.Path, name: str, dim: str, values, *, times=None,
               quoted: bool = True, blank_lines: bool = True) -> None:
  """A gold-standard ARFF as in the AVEC 2016 release (`times` default: row k at k * 0.04 s)."""
  times = np.arange(len(values)) * 0.04 if times is None else times
  gap = "\n" if blank_lines else ""
  head = (f"@relation GOLDSTANDARD_{dim.upper()}\n{gap}@attribute Instance_name string\n"
          f"@attribute frameTime numeric\n@attribute GoldStandard numeric\n{gap}@data\n{gap}")
  label = f"'{name}'" if quoted else name
  rows = "".join(f"{label},{t:.6f},{v:.6f}\n" for t, v in zip(times, values))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(head + rows)


def write_recording(manual_dir: pathlib.Path, name: str, *, seconds: float, fps: float,
                    wav_rate: int, wav_channels: int, wav_seconds: float | None = None,
                    extra_rows: int = 0, present: Callable[[int], bool] = lambda i: True,
                    phase: float = 0.0, quoted: bool = True, truncate: bool = False) -> Truth:
  """The four files of one recording; the ARFFs have floor(seconds * 25) + 1 + extra_rows rows.
  `truncate` cuts the video file in half (its header first, so that it still probes whole)."""
  num = round(seconds * fps)
  frames = list(face_frames(num, present))
  video = manual_dir / "recordings_video" / f"{name}.mp4"
  video.parent.mkdir(parents=True, exist_ok=True)
  mf.write_video(video, (f for f, _ in frames), fps, audio_CxN=tones(seconds, 44100)[None],
                 faststart=truncate)
  if truncate:
    video.write_bytes(video.read_bytes()[:video.stat().st_size // 2])
  sound = tones(wav_seconds or seconds, wav_rate)
  wav = manual_dir / "recordings_audio" / f"{name}.wav"
  wav.parent.mkdir(parents=True, exist_ok=True)
  mf.write_wav(wav, np.stack([sound * (1 - 0.1 * c) for c in range(wav_channels)]), wav_rate)
  rows = int(np.floor(seconds * 25 + 1e-9)) + 1 + extra_rows
  valence, arousal = gold(rows, phase)
  gold_dir = manual_dir / "ratings_gold_standard"
  write_arff(gold_dir / "valence" / f"{name}.arff", name, "valence", valence, quoted=quoted)
  write_arff(gold_dir / "arousal" / f"{name}.arff", name, "arousal", arousal, quoted=quoted,
             blank_lines=quoted)
  return Truth(name, fps, [b for _, b in frames], valence, arousal)


def write_recola(manual_dir: pathlib.Path) -> dict[str, Truth]:
  """2 train and 3 dev recordings; dev_2 shows no face at all, dev_3's video is cut in half
  (both skipped when prepared).

  train_1: 10 s at 30 fps, 48 kHz stereo wav. train_2: 8 s at 25 fps, 44.1 kHz mono wav of
  8.1 s, 2 label rows more than the video's frames, unquoted names, an ARFF without blank lines.
  dev_1: 6 s at 30 fps, no face in source frames 0-14 and 60-104, 22.05 kHz 6-channel wav.
  """
  out = {
      "train_1": write_recording(manual_dir, "train_1", seconds=10, fps=30, wav_rate=48000,
                                 wav_channels=2),
      "train_2": write_recording(manual_dir, "train_2", seconds=8, fps=25, wav_rate=44100,
                                 wav_channels=1, wav_seconds=8.1, extra_rows=2, phase=1.0,
                                 quoted=False),
      "dev_1": write_recording(manual_dir, "dev_1", seconds=6, fps=30, wav_rate=22050,
                               wav_channels=6, present=lambda i: 15 <= i < 60 or i >= 105,
                               phase=2.0),
      "dev_2": write_recording(manual_dir, "dev_2", seconds=2, fps=25, wav_rate=16000,
                               wav_channels=1, present=lambda i: False),
      "dev_3": write_recording(manual_dir, "dev_3", seconds=3, fps=25, wav_rate=16000,
                               wav_channels=1, truncate=True),
  }
  return out
