"""Writers of small real media files for tests: videos with a moving real face, tones, wavs.

Every video frame carries its source frame index as a 10-bit code in its top strip (`read_index`
reads it back), so tests can tell which source frame a decoder returned.
"""
import fractions
import itertools
from typing import Callable, Iterable

import av
import cv2
import numpy as np
import skimage.data
import soundfile as sf

# Hand-labelled (x, y, w, h) of the face in skimage.data.astronaut() (brows to chin, ear to ear).
ASTRONAUT_FACE_BOX = (176, 66, 96, 100)
_PATCH = (50, 180, 160, 290)  # rows, cols of the face with ~15% margin around ASTRONAUT_FACE_BOX
BITS, BIT_W, BIT_H = 10, 16, 12


def face_patch(side: int) -> tuple[np.ndarray, np.ndarray]:
  """The astronaut's face as a [side, side, 3] patch, and its face box (x, y, w, h) in the patch."""
  r0, r1, c0, c1 = _PATCH
  s = side / (r1 - r0)
  patch = cv2.resize(skimage.data.astronaut()[r0:r1, c0:c1], (side, side),
                     interpolation=cv2.INTER_AREA)
  x, y, w, h = ASTRONAUT_FACE_BOX
  return patch, np.array([(x - c0) * s, (y - r0) * s, w * s, h * s], np.float32)


def stamp_index(frame_HxWx3: np.ndarray, index: int) -> None:
  """Writes `index` in place as white/black blocks across the top strip (bit 0 leftmost)."""
  for b in range(BITS):
    frame_HxWx3[:BIT_H, b * BIT_W:(b + 1) * BIT_W] = 255 * ((index >> b) & 1)


def read_index(frame_HxWx3: np.ndarray) -> int:
  """Reads back the code written by `stamp_index` (survives lossy compression)."""
  means = [frame_HxWx3[2:BIT_H - 2, b * BIT_W + 3:(b + 1) * BIT_W - 3].mean() for b in range(BITS)]
  return sum(1 << b for b, m in enumerate(means) if m > 128)


def indexed_frames(num_frames: int, width: int = 160, height: int = 16):
  """Yields black frames [height, width, 3] stamped with their index."""
  for i in range(num_frames):
    frame = np.zeros((height, width, 3), np.uint8)
    stamp_index(frame, i)
    yield frame


def background(width: int, height: int) -> np.ndarray:
  """A textured face-free background (the coffee picture of scikit-image)."""
  return cv2.resize(skimage.data.coffee(), (width, height), interpolation=cv2.INTER_AREA)


def moving_face(num_frames: int, *, width: int = 320, height: int = 240, face_px: int = 100,
                present: Callable[[int], bool] = lambda i: True):
  """Yields (frame_HxWx3, face_box or None): the face slides left to right, index stamped."""
  bg = background(width, height)
  patch, box = face_patch(face_px)
  for i in range(num_frames):
    frame = bg.copy()
    face = None
    if present(i):
      x = round((width - face_px) * i / max(1, num_frames - 1))
      y = (height - face_px) // 2 + BIT_H // 2
      frame[y:y + face_px, x:x + face_px] = patch
      face = box + np.array([x, y, 0, 0], np.float32)
    stamp_index(frame, i)
    yield frame, face


def tones(freqs_hz: Iterable[float], rate: int, *, amplitude: float = 0.5) -> np.ndarray:
  """One second of sine per frequency, concatenated, phase-continuous: float32 [N]."""
  f = np.repeat(np.asarray(list(freqs_hz), np.float64), rate)
  return (amplitude * np.sin(2 * np.pi * np.cumsum(f) / rate)).astype(np.float32)


def stereo(mono: np.ndarray, right_gain: float = 0.5) -> np.ndarray:
  """[2, N]: left = mono, right = right_gain * mono (their mean is (1 + right_gain) / 2 * mono)."""
  return np.stack([mono, right_gain * mono]).astype(np.float32)


def write_video(path, frames: Iterable[np.ndarray], fps, *, audio_CxN: np.ndarray | None = None,
                audio_rate: int = 44100, codec: str | None = None, faststart: bool = False,
                rotation: int = 0, video_start_s: float = 0.0, audio_start_s: float = 0.0):
  """Writes RGB frames at `fps` (H.264 if FFmpeg has libx264, else MPEG-4) and AAC audio [C, N].

  `faststart` puts the MP4 header before the data (as streaming sites do); `rotation`: degrees
  counter-clockwise a player turns the frames (a phone's portrait video: -90, its frames stored
  turned by +90); each stream starts at its `*_start_s` on the file's clock.
  """
  codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
  rate = fractions.Fraction(fps).limit_denominator(1001)
  frames = iter(frames)
  first = next(frames)
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(str(path), "w", options=options) as out:
    video = out.add_stream(codec, rate=rate)
    video.width, video.height, video.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
    video.options = {"crf": "18", "preset": "ultrafast"} if codec == "libx264" else {}
    if rotation:
      video.set_display_rotation(rotation)
    if codec != "libx264":
      video.bit_rate = 4_000_000
    if audio_CxN is not None:
      layout = {1: "mono", 2: "stereo"}[audio_CxN.shape[0]]
      sound = out.add_stream("aac", rate=audio_rate, layout=layout)
      step = 1024
      for start in range(0, audio_CxN.shape[1], step):
        chunk = np.ascontiguousarray(audio_CxN[:, start:start + step], np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = audio_rate, start + round(audio_start_s * audio_rate)
        out.mux(sound.encode(frame))
      out.mux(sound.encode(None))
    for i, image in enumerate(itertools.chain([first], frames), round(video_start_s * rate)):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
      frame.pts = i  # in 1 / rate
      out.mux(video.encode(frame))
    out.mux(video.encode(None))


def write_wav(path, audio_CxN: np.ndarray, rate: int, subtype: str = "PCM_16") -> None:
  sf.write(str(path), np.asarray(audio_CxN).T, rate, subtype=subtype)


def dominant_hz(waveform: np.ndarray, rate: int) -> float:
  """The frequency of the largest FFT bin (Hann window)."""
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  return float(np.argmax(spectrum) * rate / len(waveform))
