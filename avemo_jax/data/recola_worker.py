"""What one worker process does with one RECOLA recording (recola.py runs these in a pool):
decode its audio, track and crop its face in every 40 ms frame, and leave the results in files
for the main process to write, with a report of what was trimmed, or the reason to skip it."""
import concurrent.futures
import itertools
import os
import pathlib
import time
from typing import Any, NamedTuple

import cv2
import numpy as np
from absl import logging

from avemo_jax.data import faces, media, tfds_common
from avemo_jax.data.recola_files import FPS, MAX_MISMATCH_S, Checked

SAMPLE_RATE = 16_000
HOP = SAMPLE_RATE // FPS  # 640 audio samples per frame
PROGRESS_EVERY_S = 10.0


class Job(NamedTuple):
  """One recording to decode, track and crop; results go to files under `spill`."""
  checked: Checked
  spill: str
  size: int
  margin: float
  jpeg_quality: int
  detector: faces.FaceDetector
  detect_every: int
  smooth: float
  log: bool  # log progress here (when run in the main process)


def _fit(audio: np.ndarray, length: int) -> tuple[np.ndarray, list[str]]:
  """`audio` cut or zero-padded to `length` samples, and a note saying which."""
  if len(audio) > length:
    return audio[:length], [f"audio: {(len(audio) - length) / SAMPLE_RATE:.3f} s after the last "
                            "frame dropped"]
  if len(audio) < length:
    pad = length - len(audio)
    return np.pad(audio, (0, pad)), [f"audio: last {pad / SAMPLE_RATE:.3f} s zero-padded"]
  return audio, []


def _crop_video(job: Job, crops_path: str) -> tuple[list, list, int] | None:
  """Streams the tracked face crops of the first (label rows) frames to `crops_path` as
  length-prefixed JPEGs; returns (boxes, detected flags, frames left after those, up to 1 s + 1),
  or None when no frame shows a face. Raises ValueError for a video that cannot be decoded."""
  c, rows = job.checked, len(job.checked.labels)
  # A first pass finds the first face: frames before it take its box, and no frames are held.
  box = faces.first_box(media.video_frames(c.files.video, FPS), job.detector, job.detect_every)
  if box is None:
    return None
  stream = media.video_frames(c.files.video, FPS)
  tracked = faces.track(itertools.islice(stream, rows), job.detector, margin=job.margin,
                        size=job.size, name=str(c.files.video), smooth=job.smooth,
                        detect_every=job.detect_every, box=box)
  progress = _Progress(os.path.join(job.spill, f"{c.files.name}.progress"), c.files.name, rows,
                       job.log)
  boxes, detected = [], []
  with open(crops_path, "wb") as out:
    for face in tracked:
      data = tfds_common.encode_jpeg(face.crop, job.jpeg_quality)
      out.write(len(data).to_bytes(4, "little") + data)
      boxes.append(face.box)
      detected.append(face.detected)
      progress.update(len(boxes))
  extra = sum(1 for _ in itertools.islice(stream, int(MAX_MISMATCH_S * FPS) + 1))
  stream.close()
  return boxes, detected, extra


def process(job: Job) -> dict[str, Any] | tfds_common.Skip:
  """Crops every frame of a recording into `<spill>/<name>.crops` (written as they stream) and
  its arrays into `<name>.npz`; returns its report, or why it is skipped."""
  c = job.checked
  name, rows, video = c.files.name, len(c.labels), str(c.files.video)
  start = time.monotonic()
  if not job.log:  # a pool worker: one recording per core beats OpenCV's threads fighting over it
    cv2.setNumThreads(1)
  try:
    audio = media.load_audio(c.files.audio)
  except ValueError as e:
    return tfds_common.Skip("unreadable audio", str(e), str(c.files.audio))
  if abs(len(audio) / SAMPLE_RATE - rows / FPS) > MAX_MISMATCH_S:
    return tfds_common.Skip("audio length", f"{c.files.audio}: decodes to "
                            f"{len(audio) / SAMPLE_RATE:.2f} s, its labels cover "
                            f"{rows / FPS:.2f} s; re-download it", str(c.files.audio))
  try:
    cropped = _crop_video(job, os.path.join(job.spill, f"{name}.crops"))
  except ValueError as e:
    return tfds_common.Skip("unreadable video", str(e), video)
  if cropped is None:
    return tfds_common.Skip("no face in the video", f"{video}: no face found in any frame "
                            "(faces must be frontal and upright); check the video", video)
  boxes, detected, extra = cropped
  frames, limit = len(boxes), MAX_MISMATCH_S * FPS
  if rows - frames > limit or extra > limit:
    return tfds_common.Skip("video length", f"{video}: decodes to {frames + extra}"
                            f"{' or more' if extra > limit else ''} frames at 25 Hz, its labels "
                            f"have {rows} rows; re-download it", video)
  audio_s = len(audio) / SAMPLE_RATE
  audio, notes = _fit(audio, frames * HOP)
  if rows > frames:
    notes.append(f"labels: last {rows - frames} rows dropped (after the video's end)")
  if extra:
    notes.append(f"video: last {extra} frames dropped (after the last label row)")
  np.savez(os.path.join(job.spill, f"{name}.npz"), audio=audio, labels=c.labels[:frames],
           boxes=np.asarray(boxes, np.float32), detected=np.asarray(detected, bool))
  seconds = time.monotonic() - start
  return {"name": name, "ordinal": c.ordinal, "frames": frames,
          "detected": int(np.sum(detected)), "carried": frames - int(np.sum(detected)),
          "label_rows": rows, "video_frames": frames + extra,
          "video": f"{c.video_info.width}x{c.video_info.height} at {c.video_info.fps:g} fps",
          "audio": f"{audio_s:.2f} s at {c.audio_info.sample_rate} Hz, "
                   f"{c.audio_info.channels} channel(s)",
          "notes": notes, "seconds": round(seconds, 1), "frames_per_s": round(frames / seconds, 1)}


class _Progress:
  """Writes the frames done to a file every 2 s (the main process sums them), and logs every
  10 s when running in the main process."""

  def __init__(self, path: str, name: str, total: int, log: bool):
    self.path, self.name, self.total, self.log = path, name, total, log
    self.start = self.written = self.logged = time.monotonic()

  def update(self, done: int) -> None:
    now = time.monotonic()
    if now - self.written >= 2.0:
      self.written = now
      pathlib.Path(self.path).write_text(str(done))
    if self.log and now - self.logged >= PROGRESS_EVERY_S:
      self.logged = now
      rate = done / (now - self.start)
      logging.info("recola %s: frame %d/%d, %.0f frames/s, ETA %.1f min", self.name, done,
                   self.total, rate, (self.total - done) / rate / 60)


def frames_done(jobs: list[Job], futures: list[concurrent.futures.Future]) -> int:
  """Label frames done so far: all of finished (or skipped) recordings, and what running ones
  wrote to their progress files."""
  done = 0
  for job, future in zip(jobs, futures):
    if future.done():
      done += len(job.checked.labels)
      continue
    path = pathlib.Path(job.spill) / f"{job.checked.files.name}.progress"
    if path.exists():
      done += int(path.read_text() or 0)
  return done
