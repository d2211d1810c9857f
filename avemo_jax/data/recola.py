"""RECOLA (AVEC 2016 release) as a tfds builder with `manual_dir`, and its readers.

What to get (licensed: the AVEC 2016 release of RECOLA, from its organisers) and where to put it,
under one folder MANUAL_DIR:

  MANUAL_DIR/recordings_audio/{train,dev}_N.wav
  MANUAL_DIR/recordings_video/{train,dev}_N.mp4
  MANUAL_DIR/ratings_gold_standard/{arousal,valence}/{train,dev}_N.arff
  python tools/prepare_recola.py --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

Test recordings (no public labels) are not prepared. Each recording is decoded as a stream: video
frames at 25 Hz (`media.video_frames`: label frame k shows the picture on screen at k * 0.04 s),
the face found by OpenCV's detector and cropped (`faces.track`; a frame without a detection keeps
the last box, frames before the first face take the first box), audio as 16 kHz mono (any rate
and channel count), valence and arousal from the two ARFFs.

Stored (DATA_DIR/recola/<size>px_margin<m>/1.0.0, ArrayRecord), splits "train" and "dev": one
example per 40 ms frame, in recording then time order, holding everything of that frame: the face
crop (JPEG), valence and arousal, the frame's 640 audio samples (float32, 16 kHz), whether the
frame had its own face detection (with detect_every n, the frames between detections count as
detected), the box cropped, and the recording's ordinal and the frame index. The list of
recordings (name, first example, length) and the preparation report are in metadata.json. So a
face is one read of ~11 KiB (140 px; Grain threads fetch frames while the network runs), a whole
recording one contiguous run (~1 s for 300 s; the audio stage's clips slice each recording's audio,
read once), and nothing is stored twice (~1.5 GB for the 18 recordings).

Workers write each finished recording to DATA_DIR/recola_spill_<variant>_<settings>/ (up to the
data set's size again, removed once it is written): a preparation that stops (Ctrl-C, killed, a
full disk) resumes there, and the same command again processes only the recordings not finished
(or whose files changed).

Alignment: frame k is label row k (frameTime k * 0.04 s), video frame k and audio samples
640 k .. 640 (k + 1). A recording keeps T = min(label rows, video frames) frames; audio is cut or
zero-padded to exactly T * 640 samples. Differences up to 1 s are trimmed so and noted in the
report; more is an error before anything runs (file headers), or a counted skip of the recording
when only decoding finds it. Bad ARFFs (header, a row, a frameTime off the 40 ms grid, valence
and arousal files of different lengths) and missing files are errors that list every problem at
once, before the long run. A video that cannot be decoded or shows no face at all, and audio that
cannot be decoded, are skipped and counted: the report names the file and the reason.
"""
import concurrent.futures
import functools
import hashlib
import json
import os
import time
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from avemo_jax.data import audio_features, faces, spill, tfds_common
from avemo_jax.data.recola_files import FPS, SPLITS, Checked, check_all
from avemo_jax.data.recola_worker import HOP, PROGRESS_EVERY_S, Job, frames_done, process

# Audio clips hold exactly the samples of the 96 log-mel frames that `audio_features.examples_at`
# centres on a frame's middle (what the fusion stage feeds the audio encoder): 15,600 samples
# (0.975 s: 96 hops of 10 ms plus a 25 ms window), starting 7,520 samples before the frame.
CLIP_SAMPLES = (audio_features.NUM_FRAMES - 1) * audio_features.HOP_SAMPLES + \
    audio_features.WINDOW_SAMPLES


class Recola(tfds.core.GeneratorBasedBuilder):
  """RECOLA frames: face crop, valence/arousal, 40 ms of audio (see the module docstring)."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)  # tfds cannot locate files of a namespace package

  def __init__(self, *, num_workers: int = 0, detector_options: dict | None = None,
               detect_every: int = 1, smooth: float = 0.0, **kwargs):
    if detect_every < 1 or not 0 <= smooth < 1:
      raise ValueError(f"detect_every={detect_every} (>= 1), smooth={smooth} (0 <= smooth < 1)")
    self.pool, self.num_workers = tfds_common.make_pool(num_workers), max(num_workers, 0)
    self.detector_options = dict(detector_options or {})
    self.detect_every, self.smooth = detect_every, smooth
    self.spill: str | None = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    tensor = lambda shape, dtype, doc: tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc)
    return tfds_common.DatasetInfo(
        builder=self, metadata=tfds.core.MetadataDict(), disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tensor((), np.object_, "JPEG bytes of the square face crop"),
            "labels": tensor((2,), np.float32, "gold-standard valence, arousal"),
            "audio": tensor((HOP,), np.float32, "the frame's 40 ms of 16 kHz mono audio"),
            "detected": tensor((), np.bool_, "the frame had its own face detection"),
            "box": tensor((4,), np.float32, "x, y, w, h of the face box in video pixels"),
            "recording": tensor((), np.int32, "the recording's ordinal (see metadata)"),
            "frame": tensor((), np.int32, "frame index in the recording (time / 40 ms)"),
        }))

  def find_inputs(self, manual_dir) -> dict[str, list[Checked]]:
    return check_all(manual_dir)

  def _split_generators(self, dl_manager):
    checked = self.inputs  # tfds_common.prepare's find_inputs
    config = self.builder_config
    detector = faces.FaceDetector(**self.detector_options)
    settings = {"detector": detector.__getstate__(), "detect_every": self.detect_every,
                "smooth": self.smooth, "size": config.size, "margin": config.margin}
    self.info.metadata["settings"] = settings
    # One spill folder per variant and settings: a preparation that stops (killed, a full disk)
    # leaves its finished recordings there, and the same command again resumes from them.
    self.spill = spill.folder(self, {**settings, "quality": config.jpeg_quality})
    jobs = {s: [Job(c, self.spill, config.size, config.margin, config.jpeg_quality, detector,
                    self.detect_every, self.smooth, self.pool is None) for c in checked[s]]
            for s in SPLITS}
    self._finished = {s: [r for j in jobs[s] if (r := _finished(j))] for s in SPLITS}
    names = {r["name"] for s in SPLITS for r in self._finished[s]}
    if names:
      logging.info("recola: resuming with %d recordings finished before: %s", len(names),
                   ", ".join(sorted(names)))
    jobs = {s: [j for j in jobs[s] if j.checked.files.name not in names] for s in SPLITS}
    self._start = time.monotonic()
    # All recordings of both splits go to the pool now, so that no worker waits between splits.
    futures = {s: [self.pool.submit(process, j) for j in jobs[s]] if self.pool else None
               for s in SPLITS}
    return {s: self._generate_examples(s, jobs, futures) for s in SPLITS}

  def _results(self, split: str, jobs: dict[str, list[Job]], futures):
    """The results of the split's recordings finished by an earlier run, then process() of each
    of its jobs, in the order they finish (logging progress); each new result recorded."""
    yield from self._finished[split]
    if futures[split] is None:
      for job in jobs[split]:
        yield _record(job, process(job))
      return
    every_job = [j for s in SPLITS for j in jobs[s]]
    every_future = [f for s in SPLITS for f in futures[s]]
    total = sum(len(j.checked.labels) for j in every_job)
    pending = set(futures[split])
    while pending:
      done, pending = concurrent.futures.wait(pending, timeout=PROGRESS_EVERY_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
      frames = frames_done(every_job, every_future)
      rate = frames / max(time.monotonic() - self._start, 1e-9)
      logging.info("recola: %d/%d frames of %d recordings (%d finished), %.0f frames/s, ETA %.0f "
                   "min", frames, total, len(every_job), sum(f.done() for f in every_future),
                   rate, (total - frames) / max(rate, 1e-9) / 60)
      yield from (_record(j, f.result()) for j, f in zip(jobs[split], futures[split]) if f in done)

  def _generate_examples(self, split: str, jobs, futures):
    report = {"recordings": [], "skipped": {}, "examples": {}}
    for result in self._results(split, jobs, futures):
      if isinstance(result, tfds_common.Skip):
        report["skipped"][result.reason] = report["skipped"].get(result.reason, 0) + 1
        report["examples"].setdefault(result.reason, []).append(result.detail)
        logging.warning("recola: skipping a %s recording (%s): %s", split, result.reason,
                        result.detail)
        continue
      name, ordinal = result["name"], result["ordinal"]
      arrays_path = os.path.join(self.spill, f"{name}.npz")
      crops_path = os.path.join(self.spill, f"{name}.crops")
      with np.load(arrays_path) as arrays:
        audio, labels = arrays["audio"].reshape(-1, HOP), arrays["labels"]
        boxes, detected = arrays["boxes"], arrays["detected"]
      with open(crops_path, "rb") as crops:
        for t in range(result["frames"]):
          jpeg = crops.read(int.from_bytes(crops.read(4), "little"))
          yield (ordinal << 32) | t, {
              "image": jpeg, "labels": labels[t], "audio": audio[t], "detected": detected[t],
              "box": boxes[t], "recording": ordinal, "frame": t}
      report["recordings"].append(result)
    report["recordings"].sort(key=lambda r: r["ordinal"])
    first = 0
    for r in report["recordings"]:
      r["first"], first = first, first + r["frames"]
    report["frames"] = first
    self.info.metadata[split] = report
    if split == SPLITS[-1]:  # the whole run, both splits, as the user waited for it
      seconds = time.monotonic() - self._start
      frames = sum(self.info.metadata[s]["frames"] for s in SPLITS) - sum(  # this run's
          r["frames"] for s in SPLITS for r in self._finished[s])
      self.info.metadata["speed"] = {
          "frames": frames, "seconds": round(seconds, 1),
          "frames_per_s": round(frames / max(seconds, 1e-9), 1),
          "num_workers": self.num_workers}
    if not report["recordings"]:
      raise ValueError(f"no {split} recording could be prepared; skipped: {report['examples']}")


def prepare(manual_dir, data_dir, *, image_size: int = 140, margin: float = 0.1,
            jpeg_quality: int = 95, num_workers: int = 0, detect_every: int = 1,
            smooth: float = 0.0, detector_options: dict | None = None) -> tuple[dict, bool]:
  """Builds DATA_DIR/recola/<config> from MANUAL_DIR; returns (report, newly prepared).

  `detector_options` are `faces.FaceDetector` arguments (min_face, max_side, ...).
  """
  builder = Recola(config=tfds_common.crop_config(image_size, margin, jpeg_quality),
                   data_dir=data_dir, file_format="array_record", num_workers=num_workers,
                   detector_options=detector_options, detect_every=detect_every, smooth=smooth)
  return spill.prepare(builder, manual_dir)


def _stamps(job: Job) -> list[list[Any]]:
  """Size and modification time of a recording's four files: other files, another result."""
  return [[str(p), *spill.stamp(p)] for p in job.checked.files[1:]]


def _record(job: Job, result):
  """`result` of a processed recording (its spill files written), marked finished in
  `<spill>/<name>.json` for a later run (a skip is not: it is found again)."""
  if not isinstance(result, tfds_common.Skip):
    path = os.path.join(job.spill, f"{result['name']}.json")
    with open(path + ".tmp", "w") as f:
      json.dump({"result": result, "files": _stamps(job)}, f)
    os.replace(path + ".tmp", path)
  return result


def _finished(job: Job) -> dict[str, Any] | None:
  """The result an earlier run recorded for `job`'s recording, if its files are unchanged."""
  name = job.checked.files.name
  path = os.path.join(job.spill, f"{name}.json")
  if not all(os.path.exists(os.path.join(job.spill, f"{name}{ext}"))
             for ext in (".json", ".npz", ".crops")):
    return None
  with open(path) as f:
    saved = json.load(f)
  return saved["result"] if saved["files"] == _stamps(job) else None


def format_report(report: dict[str, Any]) -> str:
  """Readable lines of a prepared RECOLA's report (its metadata)."""
  lines = []
  for split in SPLITS:
    r = report.get(split)
    if not r:
      continue
    carried = sum(x["carried"] for x in r["recordings"])
    lines.append(f"{split}: {len(r['recordings'])} recordings written ({r['frames']} frames, "
                 f"{carried} without a detected face: the last face box carried), "
                 f"{sum(r['skipped'].values())} skipped")
    for x in r["recordings"]:
      lines.append(f"  {x['name']}: {x['frames']} frames ({x['carried']} carried), label rows "
                   f"{x['label_rows']}, video {x['video_frames']} frames ({x['video']}), audio "
                   f"{x['audio']}; {x['frames_per_s']:g} frames/s")
      lines.extend(f"      {note}" for note in x["notes"])
    for reason, n in r["skipped"].items():
      lines.append(f"  skipped {n}  {reason}")
      lines.extend(f"      e.g. {e}" for e in r["examples"][reason][:tfds_common.MAX_EXAMPLES])
  if "speed" in report:
    speed = report["speed"]
    lines.append(f"{speed['frames']} frames in {speed['seconds']:g} s: "
                 f"{speed['frames_per_s']:g} frames/s with {speed['num_workers']} worker processes")
  if "settings" in report:
    lines.append(f"settings: {json.dumps(report['settings'])}")
  return "\n".join(lines)


class Recording(NamedTuple):
  name: str
  labels: np.ndarray  # float32 [T, 2]: valence, arousal
  audio: np.ndarray  # float32 [T * 640]: 16 kHz mono, samples 640 t .. 640 (t + 1) are frame t
  detected: np.ndarray  # bool [T]: the frame had its own face detection
  boxes: np.ndarray  # float32 [T, 4]: x, y, w, h of the cropped box in video pixels


def _open(data_dir, split: str, image_size: int, margin: float):
  """(records, recordings list) of a prepared split."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  config = tfds_common.crop_config(image_size, margin)
  records = tfds_common.data_source(Recola, config, split, data_dir, "prepare_recola.py")
  path = epath.Path(data_dir) / Recola.name / config.name / str(Recola.VERSION)
  return records, json.loads((path / "metadata.json").read_text())[split]["recordings"]


class Recordings:
  """Random access to prepared recordings: `recordings[r]` is a Recording (all T frames read
  once, ~1 s for 300 s; the last 4 are cached), `frame(r, t)` the uint8 [S, S, 3] face of frame t
  (one read; thread-safe, as Grain threads call it)."""

  def __init__(self, records, recordings: list[dict[str, Any]]):
    self._records, self._recordings = records, recordings
    self.names = [r["name"] for r in recordings]

  def __len__(self) -> int:
    return len(self._recordings)

  def _index(self, r: int, t: int) -> int:
    rec = self._recordings[r]
    if not 0 <= t < rec["frames"]:
      raise IndexError(f"frame {t} out of range for {rec['name']} ({rec['frames']} frames)")
    return rec["first"] + t

  def _check(self, example, r: int, t: int) -> None:
    if (example["recording"], example["frame"]) != (self._recordings[r]["ordinal"], t):
      raise ValueError(f"prepared RECOLA data is inconsistent at {self.names[r]} frame {t}: "
                       "delete it and run tools/prepare_recola.py again")

  @functools.lru_cache(maxsize=4)
  def __getitem__(self, r: int) -> Recording:
    if not 0 <= r < len(self):
      raise IndexError(f"recording {r} out of range for {len(self)}")
    n = self._recordings[r]["frames"]
    examples = self._records.__getitems__(list(range(self._index(r, 0), self._index(r, n - 1) + 1)))
    self._check(examples[0], r, 0)
    self._check(examples[-1], r, n - 1)
    stack = lambda key: np.stack([e[key] for e in examples])
    return Recording(self.names[r], stack("labels").astype(np.float32),
                     stack("audio").reshape(-1).astype(np.float32), stack("detected").astype(bool),
                     stack("box").astype(np.float32))

  def frame(self, r: int, t: int) -> np.ndarray:
    example = self._records[self._index(r, t)]
    self._check(example, r, t)
    return tfds_common.decode_jpeg(example["image"])


def fingerprint(data_dir, *, image_size: int = 140, margin: float = 0.1) -> str:
  """A short hash of a prepared variant's dataset_info.json and metadata.json (its splits'
  sizes, the recordings, the preparation's settings): another preparation has another."""
  config = tfds_common.crop_config(image_size, margin)
  path = epath.Path(data_dir) / Recola.name / config.name / str(Recola.VERSION)
  digest = hashlib.sha1()
  for name in ("dataset_info.json", "metadata.json"):
    digest.update((path / name).read_bytes() if (path / name).exists() else b"")
  return digest.hexdigest()[:16]


def source(data_dir, split: str, *, image_size: int = 140, margin: float = 0.1) -> Recordings:
  """Prepared recordings of split "train" or "dev" (the variant made with these crop settings)."""
  return Recordings(*_open(data_dir, split, image_size, margin))


class Clips:
  """Audio-stage items over every `stride`-th frame of a split: {"audio" float32 [15600]: the
  samples of the 0.96 s log-mel window centred on the frame (zero outside the recording),
  "labels" float32 [2]: valence, arousal of the frame}. `audio_features.waveform_to_examples(
  audio, 16000)[0]` is the log-mel patch the fusion stage uses for that frame."""

  def __init__(self, records, recordings: list[dict[str, Any]], stride: int):
    if stride < 1:
      raise ValueError(f"stride must be >= 1, got {stride}")
    self._whole, self._read = Recordings(records, recordings), {}
    counts = [-(-r["frames"] // stride) for r in recordings]
    self._which = np.repeat(np.arange(len(recordings)), counts)
    self._t = np.concatenate([np.arange(n) * stride for n in counts]) if counts else np.zeros(0)
    self.stride = stride

  def __len__(self) -> int:
    return len(self._which)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"clip {index} out of range for {len(self)}")
    audio, labels = self._recording(int(self._which[index]))
    t = int(self._t[index])
    start = clip_start(t)
    out = np.zeros(CLIP_SAMPLES, np.float32)
    a, b = max(start, 0), min(start + CLIP_SAMPLES, len(audio))
    out[a - start:b - start] = audio[a:b]
    return {"audio": out, "labels": labels[t]}

  def _recording(self, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(audio [T * 640], labels [T, 2]) of recording r, read whole once per process (~19 MB for
    300 s), not the ~25 records (images included) that a clip's 0.96 s spans, every epoch."""
    if r not in self._read:  # Grain threads may both read it: the same values
      whole = self._whole[r]
      self._read[r] = (whole.audio, whole.labels)
    return self._read[r]


def clip_start(t: int) -> int:
  """The first audio sample (may be negative) of frame t's clip: the log-mel frame
  round((t + 0.5) * 0.04 * 100 - 48.75), times the 160-sample hop (= 640 t - 7520)."""
  first = round((t + 0.5) / FPS * audio_features.FRAME_RATE - audio_features.WINDOW_CENTRE_FRAMES)
  return first * audio_features.HOP_SAMPLES


def clips(data_dir, split: str, *, stride: int = 1, image_size: int = 140,
          margin: float = 0.1) -> Clips:
  """Audio clips with the labels of every `stride`-th frame of the prepared split (the audio is
  the same in every crop variant; name the one that was prepared)."""
  return Clips(*_open(data_dir, split, image_size, margin), stride)
