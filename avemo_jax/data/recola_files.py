"""The RECOLA AVEC 2016 files: their layout, the gold-standard ARFFs, and the checks made before
any video is decoded (recola.py prepares them).

Every check here takes seconds for the whole release, so a problem found here is an error that
lists every bad file (and row) at once, before the long run starts.
"""
import math
import pathlib
import re
from typing import NamedTuple

import numpy as np

from avemo_jax.data import media

FPS = 25  # gold-standard rows and stored frames per second (40 ms)
SPLITS = ("train", "dev")  # test labels are not public
DEV_RECORDINGS = 9  # the AVEC 2016 release's dev_1 .. dev_9, where published numbers come from
MAX_MISMATCH_S = 1.0  # label rows, video frames and audio may disagree by this much (trimmed)
_TIME_TOLERANCE_S = 0.002  # frameTime k must be k * 0.04 s within this
_REQUIRED = ("instance_name", "frametime", "goldstandard")
_RECORDING = re.compile(r"(train|dev|test)_\d+")
_NAME = re.compile(r"^(train|dev)_(\d+)$")


class Files(NamedTuple):
  """The four files of one recording, e.g. name "train_1"."""
  name: str
  audio: pathlib.Path  # recordings_audio/<name>.wav
  video: pathlib.Path  # recordings_video/<name>.mp4
  arousal: pathlib.Path  # ratings_gold_standard/arousal/<name>.arff
  valence: pathlib.Path  # ratings_gold_standard/valence/<name>.arff


class Checked(NamedTuple):
  """A recording whose files passed the checks: labels [N, 2] (valence, arousal) per 40 ms."""
  files: Files
  ordinal: int  # position among the split's recordings found (sorted by number)
  labels: np.ndarray
  audio_info: media.MediaInfo
  video_info: media.MediaInfo


def files_of(manual_dir, name: str) -> Files:
  root = pathlib.Path(manual_dir)
  gold = root / "ratings_gold_standard"
  return Files(name, root / "recordings_audio" / f"{name}.wav",
               root / "recordings_video" / f"{name}.mp4", gold / "arousal" / f"{name}.arff",
               gold / "valence" / f"{name}.arff")


def find_names(manual_dir, split: str) -> list[str]:
  """Names ("train_1", ...) of the split's recordings that have any of their four files."""
  root = pathlib.Path(manual_dir)
  folders = [root / "recordings_audio", root / "recordings_video",
             root / "ratings_gold_standard" / "arousal", root / "ratings_gold_standard" / "valence"]
  names = {p.stem for d in folders if d.is_dir() for p in d.glob(f"{split}_*.*")
           if _NAME.match(p.stem) and p.suffix.lower() in (".wav", ".mp4", ".arff")}
  return sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))


def read_gold_standard(path) -> tuple[np.ndarray, np.ndarray]:
  """(frameTime float64 [N], GoldStandard float32 [N]) of an AVEC 2016 gold-standard ARFF.

  Reads `@relation`, `@attribute <name> <type>` (any order; Instance_name, frameTime and
  GoldStandard required, others ignored), `@data` and comma-separated rows, names quoted or
  not; blank lines and `%` comments are skipped. Checks that row k has frameTime k * 0.04 s, and
  that an Instance_name of a RECOLA recording (train_7) is the file's own (a file copied to the
  wrong place); other instance names are not RECOLA's convention and are not checked.

  Raises:
    ValueError: naming the file and line (not an ARFF, a missing attribute, a bad row, a
      frameTime off the 40 ms grid).
  """
  path = pathlib.Path(path)
  fix = "re-extract it from the AVEC 2016 release"
  try:
    text = path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError:
    text = path.read_text(encoding="latin-1")
  attributes: list[str] = []
  columns = None
  times, values = [], []
  for line_no, raw in enumerate(text.splitlines(), 1):
    line = raw.strip()
    if not line or line.startswith("%"):
      continue
    if columns is None:
      word = line.split(None, 1)[0].lower()
      if word == "@attribute" and len(line.split(None, 2)) == 3:
        attributes.append(line.split(None, 2)[1].strip("'\"").lower())
      elif word == "@data":
        missing = [a for a in _REQUIRED if a not in attributes]
        if missing:
          raise ValueError(f"{path} line {line_no}: the header declares {attributes}, without "
                           f"{missing}: not an AVEC 2016 gold-standard file; {fix}")
        columns = [attributes.index(a) for a in _REQUIRED]
      elif word != "@relation":
        raise ValueError(f"{path} line {line_no}: expected @relation, @attribute or @data, got "
                         f"{line[:60]!r}: not an ARFF file; {fix}")
      continue
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != len(attributes):
      raise ValueError(f"{path} line {line_no}: {len(fields)} values where the header declares "
                       f"{len(attributes)} attributes: {line[:80]!r}; {fix}")
    instance = fields[columns[0]].strip("'\"")
    if _RECORDING.fullmatch(instance) and instance != path.stem:
      raise ValueError(f"{path} line {line_no}: Instance_name {instance!r} is another recording's: "
                       f"the file of {instance} copied as {path.name}? {fix}")
    try:
      t, v = (float(fields[c]) for c in columns[1:])
    except ValueError:
      raise ValueError(f"{path} line {line_no}: frameTime or GoldStandard is not a number "
                       f"('?' is a missing value): {line[:80]!r}; {fix}") from None
    k = len(times)
    if not (math.isfinite(v) and abs(t - k / FPS) <= _TIME_TOLERANCE_S):
      after = f" after {times[-1]:g}" if times else ""
      raise ValueError(f"{path} line {line_no} (data row {k + 1}): frameTime {t:g}{after}, "
                       f"expected {k / FPS:.2f} (one row per 40 ms from 0.00) and a finite "
                       f"GoldStandard (got {v}); {fix}")
    times.append(t)
    values.append(v)
  if columns is None or not times:
    raise ValueError(f"{path}: no {'@data section' if columns is None else 'data rows'}: not a "
                     f"gold-standard ARFF; {fix}")
  return np.asarray(times, np.float64), np.asarray(values, np.float32)


def _frames_of(info: media.MediaInfo) -> int:
  """Label frames the video gives by its header: floor(duration * 25) + 1 (media.video_frames)."""
  seconds = info.num_frames / info.fps if info.fps and info.num_frames else info.duration_s
  return math.floor(seconds * FPS + 1e-4) + 1


def check(manual_dir, name: str, ordinal: int) -> Checked | list[str]:
  """The recording's labels and media headers, or the list of its problems (one line each)."""
  files = files_of(manual_dir, name)
  missing = [str(p) for p in files[1:] if not p.is_file()]
  if missing:
    return [f"{name}: missing {', '.join(missing)}: put the file there (AVEC 2016 layout, see "
            "--help), or remove the recording's other files to leave it out"]
  problems, gold = [], {}
  for dim in ("valence", "arousal"):
    try:
      gold[dim] = read_gold_standard(getattr(files, dim))[1]
    except ValueError as e:
      problems.append(str(e))
  if len(gold) == 2 and len(gold["valence"]) != len(gold["arousal"]):
    problems.append(f"{files.valence} has {len(gold['valence'])} rows but {files.arousal} has "
                    f"{len(gold['arousal'])}: both must rate the same frames; re-extract them")
  infos = {}
  for kind, need in (("video", "has_video"), ("audio", "has_audio")):
    try:
      infos[kind] = media.probe(getattr(files, kind))
      if not getattr(infos[kind], need):
        problems.append(f"{getattr(files, kind)}: no {kind} stream; re-download the file")
    except (ValueError, FileNotFoundError) as e:
      problems.append(str(e))
  if problems:
    return problems
  rows = len(gold["valence"])
  video_frames = _frames_of(infos["video"])
  if abs(video_frames - rows) > MAX_MISMATCH_S * FPS:
    problems.append(f"{files.video} gives {video_frames} frames at 25 Hz "
                    f"({infos['video'].num_frames} at {infos['video'].fps:g} fps) but "
                    f"{files.valence} has {rows} rows (40 ms each): more than "
                    f"{MAX_MISMATCH_S:g} s apart; check that the files belong together")
  audio_s = infos["audio"].duration_s
  if abs(audio_s - rows / FPS) > MAX_MISMATCH_S:
    problems.append(f"{files.audio} lasts {audio_s:.2f} s but {files.valence} has {rows} rows "
                    f"({rows / FPS:.2f} s): more than {MAX_MISMATCH_S:g} s apart; check that "
                    "the files belong together")
  if problems:
    return problems
  labels = np.stack([gold["valence"], gold["arousal"]], axis=1)
  return Checked(files, ordinal, labels, infos["audio"], infos["video"])


def check_all(manual_dir) -> dict[str, list[Checked]]:
  """Every recording of train and dev, checked; raises one error listing all problems."""
  root = pathlib.Path(manual_dir)
  out, problems = {}, []
  for split in SPLITS:
    names = find_names(root, split)
    if not names:
      problems.append(f"no {split} recordings in {root}: expected recordings_audio/{split}_N.wav, "
                      f"recordings_video/{split}_N.mp4 and ratings_gold_standard/"
                      f"{{arousal,valence}}/{split}_N.arff (the AVEC 2016 layout)")
    results = [check(root, name, i) for i, name in enumerate(names)]
    problems += [p for r in results if isinstance(r, list) for p in r]
    out[split] = [r for r in results if isinstance(r, Checked)]
  if problems:
    raise ValueError(f"RECOLA: {len(problems)} problem(s) in --manual_dir={root}; nothing was "
                     "prepared:\n  - " + "\n  - ".join(problems))
  return out
