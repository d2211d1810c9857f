"""Streaming decoding of video and audio files (`.mp4`, `.wav`, anything FFmpeg reads) with PyAV.

Time 0 is the first decoded frame of the video stream for pictures and the first decoded sample of
the audio stream for sound; `MediaInfo` has both streams' start times, to line them up. Frames
come out as a player shows them: turned upright by the display matrix (phones' portrait videos).
A cover picture (an attached thumbnail stream) is not the video. Nothing here holds a whole video
in memory: frames are decoded and converted one at a time, and audio decoding never decodes the
picture stream.
"""
import dataclasses
import fractions
import math
import os
from typing import Iterator

import av
import numpy as np

from avemo_jax.data import audio_features

__all__ = ["MediaInfo", "probe", "video_frames", "load_audio"]

_EPS_S = 1e-4  # timestamps closer than this count as equal (frame times are rationals)
_TRUNCATED_S = 0.5  # decoded media shorter than the header says by more than this is truncated


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What the container says about a media file (num_frames may be an estimate)."""
  path: str
  duration_s: float
  has_video: bool
  fps: float  # 0.0 without a video stream
  num_frames: int
  width: int  # as shown: the stored size turned by `rotation`
  height: int
  rotation: int  # degrees counter-clockwise the player turns the stored frames: 0, 90, 180, 270
  video_start_s: float  # the first decoded frame's time on the file's clock (0.0 without one)
  has_audio: bool
  sample_rate: int  # 0 without an audio stream
  channels: int
  audio_start_s: float


def _open(path) -> av.container.InputContainer:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file; check the path (or the data set's manual_dir)")
  try:
    return av.open(path)
  except (av.FFmpegError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: FFmpeg cannot read this file ({e}); it is truncated or not a media "
                     "file: re-download or re-encode it (e.g. `ffmpeg -i IN OUT.mp4`)") from e


def _seconds(value, time_base) -> float | None:
  return None if value is None or time_base is None else float(value * time_base)


def _video_stream(container) -> av.video.stream.VideoStream | None:
  """The first video stream that is not a cover picture."""
  return next((s for s in container.streams.video
               if not s.disposition & av.stream.Disposition.attached_pic), None)


def _quarter_turns(frame: av.VideoFrame) -> int:
  """Counter-clockwise quarter turns that show `frame` upright (its display matrix's rotation)."""
  return round(frame.rotation / 90) % 4


def _first_frames(container, streams: list) -> dict[int, av.frame.Frame]:
  """The first decoded frame of each of `streams`, by stream index (none for one that fails)."""
  first = {}
  try:
    for packet in container.demux(*streams):
      if packet.stream.index not in first:
        first.update((packet.stream.index, f) for f in packet.decode()[:1])
      if len(first) == len(streams):
        break
  except av.FFmpegError:  # video_frames and load_audio say what is wrong
    pass
  return first


def probe(path) -> MediaInfo:
  """Reads the header of `path`, and the first decoded frame of each stream (for the display
  rotation, and the times that video_frames' and load_audio's time 0 are at)."""
  with _open(path) as container:
    video = _video_stream(container)
    audio = container.streams.audio[0] if container.streams.audio else None
    durations = [_seconds(s.duration, s.time_base) for s in (video, audio) if s is not None]
    if container.duration is not None:
      durations.append(container.duration / av.time_base)
    duration_s = max([d for d in durations if d is not None], default=0.0)
    fps = float(video.average_rate or video.guessed_rate or 0) if video else 0.0
    if video and not video.frames:
      num_frames = round((_seconds(video.duration, video.time_base) or duration_s) * fps)
    else:
      num_frames = video.frames if video else 0
    first = _first_frames(container, [s for s in (video, audio) if s is not None])
    turns = _quarter_turns(first[video.index]) if video and video.index in first else 0
    width, height = (video.width, video.height) if video else (0, 0)
    start = lambda s: float(first[s.index].time or 0.0) if s and s.index in first else 0.0
    return MediaInfo(
      path=os.fspath(path), duration_s=duration_s, has_video=video is not None, fps=fps,
      num_frames=num_frames, width=height if turns % 2 else width,
      height=width if turns % 2 else height, rotation=90 * turns, video_start_s=start(video),
      has_audio=audio is not None, sample_rate=audio.rate if audio else 0,
      channels=audio.channels if audio else 0, audio_start_s=start(audio))


def _decode(container, stream, path) -> Iterator[av.frame.Frame]:
  """Decodes `stream` only, turning FFmpeg errors into a ValueError that names the file."""
  try:
    for packet in container.demux(stream):
      yield from packet.decode()
  except av.FFmpegError as e:
    raise ValueError(f"{path}: decoding failed ({e}); the file is corrupt or truncated: "
                     "re-download or re-encode it, or skip this recording") from e


def _rgb(frame: av.VideoFrame) -> np.ndarray:
  rgb = frame.to_ndarray(format="rgb24")
  if turns := _quarter_turns(frame):
    rgb = np.ascontiguousarray(np.rot90(rgb, turns))
  rgb.flags.writeable = False
  return rgb


def video_frames(path, fps: float = 25.0) -> Iterator[tuple[float, np.ndarray]]:
  """Yields (time_s, frame_HxWx3 RGB uint8) at `fps` label frames per second, streaming.

  Label frame k is at time k / fps and shows the source frame on screen then, upright as a player
  shows it: the latest one whose presentation time (relative to the first frame) is <= k / fps. A
  video of duration d (the last frame's time + its duration) gives floor(d * fps) + 1 label frames
  at times 0 .. floor(d * fps) / fps inclusive: 300 s -> 7,501 frames at 0.00 .. 300.00 s, as the
  AVEC 2016 label files. Any source rate: a higher one skips frames, a lower one repeats them.
  Frames are read-only (a repeated frame is the same array): copy one before changing it.

  Raises:
    FileNotFoundError / ValueError: the file is missing, unreadable, has no video stream, or is
      truncated (decoding ends more than 0.5 s before the duration in its header).
  """
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  path = os.fspath(path)
  with _open(path) as container:
    stream = _video_stream(container)
    if stream is None:
      raise ValueError(f"{path}: no video stream; give a video file (load_audio reads sound only)")
    stream.thread_type = "AUTO"  # frame threads: ~1.4x faster on 2 busy cores
    tb = stream.time_base or fractions.Fraction(1, 90000)
    src_dt = 1.0 / float(stream.average_rate or stream.guessed_rate or fps)
    start = None
    k = 0
    prev, prev_rgb = None, None  # the frame on screen, and its RGB array once converted
    t_prev = 0.0
    for index, frame in enumerate(_decode(container, stream, path)):
      if frame.pts is None:
        t = index * src_dt
      else:
        start = frame.pts if start is None else start
        t = float((frame.pts - start) * tb)
      while prev is not None and k / fps < t - _EPS_S:
        prev_rgb = _rgb(prev) if prev_rgb is None else prev_rgb
        yield k / fps, prev_rgb
        k += 1
      prev, prev_rgb, t_prev = frame, None, t
    if prev is None:
      raise ValueError(f"{path}: the video stream has no decodable frame; re-encode the file")
    frame_dt = float(prev.duration * tb) if prev.duration else src_dt
    duration = t_prev + frame_dt
    header = _seconds(stream.duration, stream.time_base)
    if header is not None and duration < header - _TRUNCATED_S:
      raise ValueError(f"{path}: frames end at {duration:.2f} s but the header says "
                       f"{header:.2f} s; the file is truncated: re-download it, or skip it")
    last = math.floor(duration * fps + _EPS_S)
    while k <= last:
      prev_rgb = _rgb(prev) if prev_rgb is None else prev_rgb
      yield k / fps, prev_rgb
      k += 1


def _check_riff_size(path: str) -> None:
  """FFmpeg clamps a WAV's sizes to the bytes present, so compare the RIFF size with the file's."""
  with open(path, "rb") as f:
    head = f.read(12)
  if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
    declared = int.from_bytes(head[4:8], "little") + 8
    if 8 < declared < 0xFFFFFFFF and os.path.getsize(path) < declared:  # 0 / ~0: size unknown
      raise ValueError(f"{path}: {os.path.getsize(path)} bytes but its RIFF header says "
                       f"{declared}; the file is truncated: re-download it, or skip this recording")


def load_audio(path) -> np.ndarray:
  """Decodes the first audio stream of `path` (a `.wav`, or a video's sound) -> float32 mono [N]
  at 16 kHz.

  Any input rate and channel count: channels are averaged, then resampled as `vggish_input` does
  (`audio_features.to_mono_16k`), so a `.wav` gives what `audio_features.load_audio` gives (to
  ~1e-6). Sample 0 is the first decoded sample. Only audio packets are decoded.

  Raises:
    FileNotFoundError / ValueError: the file is missing, unreadable, truncated, or has no audio.
  """
  path = os.fspath(path)
  with _open(path) as container:
    if not container.streams.audio:
      raise ValueError(f"{path}: no audio stream; give a file with a sound track, or a .wav")
    _check_riff_size(path)
    stream = container.streams.audio[0]
    to_float = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
    chunks = [planar.to_ndarray().mean(axis=0, dtype=np.float32)
              for frame in _decode(container, stream, path) for planar in to_float.resample(frame)]
    native = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    del chunks  # one copy of the sound at its own rate, not two, while it is resampled
    if not len(native):
      raise ValueError(f"{path}: the audio stream has no decodable sample; re-encode the file")
    waveform = audio_features.to_mono_16k(native, stream.rate)
    seconds = len(waveform) / audio_features.SAMPLE_RATE
    header = _seconds(stream.duration, stream.time_base)
    if header is not None and seconds < header - _TRUNCATED_S:
      raise ValueError(f"{path}: audio ends at {seconds:.2f} s but the header "
                       f"says {header:.2f} s; the file is truncated: re-download it, or skip it")
    return waveform
