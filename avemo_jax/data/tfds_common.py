"""Shared parts of the tfds builders: finding their CSVs, JPEG coding (crops: `faces.crop`),
cropping a CSV's rows (or each distinct face once) in a bounded process pool into a journal
(`spill.CropJournal`: a preparation that stops resumes from it), the skip report, and the lookup of
and random access to prepared data.

Prepared crops are stored as JPEG bytes (quality 95 by default) and decoded when read. Measured
on 316 AffectNet-format fixtures at 140 px: 9.6 KiB per example on disk against 50.6 KiB for raw
uint8 crops (ArrayRecord compresses those a little), and reading one example through the tfds
data source takes about as long either way (~1 ms: JPEG read 0.2 + decode 0.5-0.8 ms; raw
read ~1 ms, its 57 KiB being decompressed and parsed). Re-encoding costs ~2 grey levels of mean
absolute error at quality 95.
"""
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import io
import math
import multiprocessing
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from avemo_jax.data import faces

if TYPE_CHECKING:  # spill imports this module
  from avemo_jax.data import spill

MAX_EXAMPLES = 5  # CSV lines quoted per skip reason in a report


class DatasetInfo(tfds.core.DatasetInfo):
  """`tfds.core.DatasetInfo` that never looks for our data sets in TFDS's catalog bucket (they
  are not there): the stock lookup, made whenever a builder's data is not prepared yet, left an
  empty `/tmp/tmp*tfds` directory behind each time."""

  def initialize_from_bucket(self) -> None:
    return


@dataclasses.dataclass(eq=False)
class CropConfig(tfds.core.BuilderConfig):
  """One prepared variant: crops of side `size` around the box enlarged by `margin`."""
  size: int = 140
  margin: float = 0.1
  jpeg_quality: int = 95


def crop_config(size: int, margin: float, jpeg_quality: int = 95) -> CropConfig:
  """The builder config (and data folder name) of a crop size and margin."""
  if size < 8 or not 0 <= margin <= 2 or not 1 <= jpeg_quality <= 100:
    raise ValueError(f"image_size={size} (>= 8), margin={margin} (0-2) or "
                     f"jpeg_quality={jpeg_quality} (1-100) out of range")
  return CropConfig(name=f"{size}px_margin{margin:g}", size=size, margin=margin,
                    jpeg_quality=jpeg_quality,
                    description=f"{size}x{size} crops, box side enlarged by {margin:g} per side")


class Job(NamedTuple):
  """One image to crop: `box` is (x0, y0, x1, y1) in pixels, or in fractions of the width and
  height when `fractional`; `jpeg_only` rejects files that are not JPEGs."""
  path: str
  box: tuple[float, float, float, float]
  fractional: bool = False
  jpeg_only: bool = False


class Skip(NamedTuple):
  """Why a job's image could not be used."""
  reason: str
  detail: str
  path: str


def encode_jpeg(image_HxWx3: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image_HxWx3).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  """uint8 [H, W, 3] from stored JPEG bytes."""
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def _load(job: Job, size: int, margin: float, decoded: dict | None = None
          ) -> tuple[np.ndarray, tuple[float, ...]]:
  """The decoded image and the box in its pixels. Large JPEGs are decoded at a reduced scale
  that keeps the face at >= 2 * size pixels (measured: crops as close to the ideal resize as
  from the full decode; 1x would be 2.5x faster but blurrier). `decoded`, kept over the jobs of
  one file, reuses its decode at the same scale. Raises FileNotFoundError, or OSError for
  unreadable files."""
  decoded = {} if decoded is None else decoded
  try:
    with Image.open(job.path) as im:
      if job.jpeg_only and im.format != "JPEG":
        raise OSError(f"a {im.format} file where a JPEG was expected (a dead link's placeholder?)")
      w, h = im.size
      box = job.box
      if job.fractional:
        box = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
      side = max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * margin)
      if side > 4 * size:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, keeping the face >= 2 * size
        im.draft("RGB", (math.ceil(w * 2 * size / side), math.ceil(h * 2 * size / side)))
      sx, sy = im.size[0] / w, im.size[1] / h
      key = (job.path, im.size)  # the size after draft names its scale: the same pixels
      if key not in decoded:
        decoded[key] = np.asarray(im.convert("RGB"))
      return decoded[key], (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise OSError(f"{type(e).__name__}: {e}") from e  # PIL's ways of saying "broken file"


def crop_job(job: Job, config: CropConfig, decoded: dict | None = None) -> bytes | Skip:
  """The JPEG-encoded crop of a job, or why its image could not be used (`decoded`: `_load`)."""
  try:
    image, box = _load(job, config.size, config.margin, decoded)
  except FileNotFoundError:
    return Skip("missing image", "file not found", job.path)
  except OSError as e:
    return Skip("unreadable image", str(e), job.path)
  try:
    x0, y0, x1, y1 = box
    face = faces.crop(image, (x0, y0, x1 - x0, y1 - y0), margin=config.margin, size=config.size)
  except ValueError as e:
    return Skip("bad box", str(e), job.path)
  return encode_jpeg(face, config.jpeg_quality)


def crop_each(jobs: tuple[Job, ...], config: CropConfig) -> list[bytes | Skip]:
  """crop_job of each job; jobs of one file share its decode at each scale."""
  decoded = {}
  return [crop_job(job, config, decoded) for job in jobs]


def _map_chunk(fn: Callable, chunk: list) -> list:
  return [fn(x) for x in chunk]


def make_pool(num_workers: int) -> concurrent.futures.Executor | None:
  """Spawned worker processes (safe beside threads, e.g. JAX's), or None for num_workers <= 0."""
  if num_workers <= 0:
    return None
  return concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn"))


def parallel_map(fn: Callable, items: Iterable, pool: concurrent.futures.Executor | None, *,
                 window: int, chunk: int = 32) -> Iterator:
  """fn(item) for every item, in order, in `pool` (or here). At most `window` chunks are in
  flight (2 per worker is plenty), so memory stays bounded however many items there are."""
  if pool is None:
    yield from map(fn, items)
    return
  pending, it = collections.deque(), iter(items)
  try:
    while True:
      while len(pending) < window:
        part = [x for _, x in zip(range(chunk), it)]
        if not part:
          break
        pending.append(pool.submit(_map_chunk, fn, part))
      if not pending:
        return
      yield from pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()


def crop_rows(builder, rows: Iterable[tuple[int, Any, tuple[Job, ...]]],
              journal: "spill.CropJournal", report: "SplitReport", root, what: str
              ) -> Iterator[tuple[int, Any, tuple[bytes, ...]]]:
  """(line, row, JPEG crops) for each (line, row, jobs) of a CSV whose images all crop, in
  order: jobs in `journal` are read from it, the others cropped by `builder.pool` (at most
  `builder.window` chunks in flight) and added to it; a row whose image fails is counted in
  `report` (its first failure), named by its path under `root`. Logs progress as `what`."""
  in_flight = collections.deque()  # (line, row, jobs, jobs to crop) of the rows submitted

  def new_jobs():
    for line, row, jobs in rows:
      new = tuple(job for job in jobs if job not in journal)  # () when all are journaled
      in_flight.append((line, row, jobs, new))
      yield new

  crop = functools.partial(crop_each, config=builder.builder_config)
  progress = Progress(what, report.lines)
  for crops in parallel_map(crop, new_jobs(), builder.pool, window=builder.window):
    line, row, jobs, new = in_flight.popleft()
    made = dict(zip(new, crops))
    for job, result in made.items():
      journal.add(job, result)
    results = [made[job] if job in made else journal[job] for job in jobs]
    progress.update(line, report)
    failed = [r for r in results if isinstance(r, Skip)]
    if failed:
      report.skip(failed[0].reason, line,
                  f"{os.path.relpath(failed[0].path, root)}: {failed[0].detail}")
    else:
      yield line, row, tuple(results)
  progress.update(report.lines, report, force=True)


def crop_distinct(builder, jobs: Iterable[Job], journal: "spill.CropJournal", what: str) -> int:
  """Crops each distinct job of `jobs` not in `journal` yet, the jobs of one file in one task
  (one decode per file and scale), in `builder.pool`, and adds the results to `journal` (a file:
  crops of a large set outgrow memory); returns the number of distinct jobs. Logs as `what`."""
  files = collections.defaultdict(dict)  # path -> {job: None}: its jobs in order of first use
  for job in jobs:
    files[job.path][job] = None
  distinct = sum(map(len, files.values()))
  groups = [new for file_jobs in files.values()
            if (new := tuple(job for job in file_jobs if job not in journal))]
  del files
  crop = functools.partial(crop_each, config=builder.builder_config)
  progress = Progress(what, len(groups), unit="file")
  results = parallel_map(crop, groups, builder.pool, window=builder.window)
  for done, (group, crops) in enumerate(zip(groups, results), 1):
    for job, result in zip(group, crops):
      journal.add(job, result)
    progress.update(done)
  progress.update(len(groups), force=True)
  return distinct


def find_csvs(manual_dir, names: dict[str, str], folders: tuple[str, ...], hint: str
              ) -> dict[str, pathlib.Path]:
  """{split: the first of manual_dir/<folder>/<name> that exists}, or an error naming the
  folders looked in, the --manual_dir flag and `hint` (what to put there)."""
  manual_dir, csvs = pathlib.Path(manual_dir), {}
  for split, name in names.items():
    found = [manual_dir / d / name for d in folders if (manual_dir / d / name).is_file()]
    if not found:
      where = " or ".join(os.fspath(manual_dir / d) for d in folders)
      raise FileNotFoundError(f"{name} not found in {where}: point --manual_dir at the folder "
                              f"that holds it (now --manual_dir={manual_dir}), or {hint}")
    csvs[split] = found[0]
  return csvs


class Records:
  """Random access to the records of a prepared split; subclasses decode one (`__getitem__`)."""

  def __init__(self, records):
    self._records = records

  def __len__(self) -> int:
    return len(self._records)


class SplitReport:
  """Counts of one CSV: rows read, examples written per split, skips per reason (with a few
  rows quoted), and notes (kept rows worth knowing about)."""

  def __init__(self, source: str, lines: int):
    self.source, self.lines = source, lines
    self.written: collections.Counter = collections.Counter()
    self.skipped: collections.Counter = collections.Counter()
    self.notes: collections.Counter = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self.extra: dict[str, Any] = {}

  def skip(self, reason: str, line: int, detail: str) -> None:
    self.skipped[reason] += 1
    if len(self.examples[reason]) < MAX_EXAMPLES:
      self.examples[reason].append(f"{self.source} line {line}: {detail}")

  def as_dict(self) -> dict[str, Any]:
    return {"source": self.source, "lines": self.lines, "written": dict(self.written),
            "skipped": dict(self.skipped), "notes": dict(self.notes),
            "examples": dict(self.examples), **self.extra}


def format_report(report: dict[str, dict[str, Any]]) -> str:
  """Readable lines of a builder's report ({split: SplitReport.as_dict()})."""
  lines = []
  for split, r in report.items():
    lines.append(f"{split} ({r['source']}, {r['lines']} lines): written "
                 f"{sum(r['written'].values())} {r['written']}, skipped "
                 f"{sum(r['skipped'].values())}")
    for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
      lines.append(f"  skipped {n:>8}  {reason}")
      lines.extend(f"      e.g. {e}" for e in r["examples"].get(reason, []))
    lines.extend(f"  note    {n:>8}  {what}" for what, n in r["notes"].items())
    lines.extend(f"  {k}: {v}" for k, v in r.items() if k not in
                 ("source", "lines", "written", "skipped", "notes", "examples"))
  return "\n".join(lines)


class Progress:
  """Logs '<what>: <unit> n/total[, written, skipped], rate, ETA' at most every `every_s` s."""

  def __init__(self, what: str, total: int, every_s: float = 10.0, unit: str = "line"):
    self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
    self.start = self.last = time.monotonic()

  def update(self, done: int, report: SplitReport | None = None, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate else float("inf")
    counts = "" if report is None else (f", {sum(report.written.values())} written, "
                                        f"{sum(report.skipped.values())} skipped")
    logging.info("%s: %s %d/%d%s, %.0f %ss/s, ETA %.0f min", self.what, self.unit, done,
                 self.total, counts, rate, self.unit, eta / 60)


def csv_rows(path) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of the rows of a UTF-8 CSV (a byte-order mark is dropped). A line the
  csv module cannot split or decode is an error naming it."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader, last = csv.reader(f), 0
    try:
      for fields in reader:
        yield reader.line_num, fields
        last = reader.line_num
    except csv.Error as e:  # e.g. a quote that never closes: the rest of the file is one field
      raise ValueError(f"{path} line {last + 1}: {e}; a quote that never closes? Fix or delete "
                       "that line") from e
    except UnicodeDecodeError as e:  # decoded ahead of the rows, a block at a time
      raise ValueError(f"{path}, line {last + 1} or soon after: not UTF-8 text ({e}); save the "
                       "file as UTF-8") from e


def check_images_exist(csv_path, paths: list[pathlib.Path], hint: str) -> None:
  """Before a long run: some image of the first rows of `csv_path` (`paths`) must exist."""
  if paths and not any(p.is_file() for p in paths):
    raise FileNotFoundError(f"none of the {len(paths)} images of the first rows of {csv_path} "
                            f"exists (e.g. {paths[0]}): {hint}")


def data_source(builder_cls: type, config: CropConfig, split: str, data_dir, tool: str,
                optional: tuple[str, ...] = ()):
  """The random-access tfds data source (ArrayRecord) of a prepared variant, read without the
  builder's code, with the `optional` splits that were prepared added to `split`; a missing
  variant names the command that makes it."""
  path = epath.Path(data_dir) / builder_cls.name / config.name / str(builder_cls.VERSION)
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(
        f"{builder_cls.name}/{config.name} is not prepared under data_dir={data_dir} (no {path}):"
        f" run python tools/{tool} --manual_dir=... --data_dir={data_dir} "
        f"--image_size={config.size} --margin={config.margin:g}")
  builder = tfds.builder_from_directory(path)
  split = "+".join([split, *(s for s in optional if s in builder.info.splits)])
  return builder.as_data_source(split=split)


def check_written(report: SplitReport, split: str) -> None:
  """An empty split is an error that says why every row was skipped."""
  if not report.written[split]:
    raise ValueError(
        f"no examples for split {split} from {report.source} ({report.lines} lines); skipped: "
        f"{dict(report.skipped)}, e.g. {[e for v in report.examples.values() for e in v][:3]}. "
        "Check --manual_dir and the image folder (see the module docstring)")


def _remove_empty(*folders: epath.Path) -> None:
  for folder in folders:  # in order: a parent after its children
    if folder.is_dir() and not any(folder.iterdir()):
      folder.rmdir()


def prepare(builder, manual_dir) -> tuple[dict, bool]:
  """Runs `builder` on `manual_dir` unless already prepared; (report, newly prepared).
  `builder.find_inputs(manual_dir)` looks for its inputs first, before tfds announces the
  preparation and makes its folders, so that a wrong --manual_dir fails at once and leaves
  nothing behind; its `_split_generators` reads what it found from `builder.inputs`.
  `builder.pool` (worker processes or None) serves all its splits and is shut down here. The
  empty folders tfds makes (downloads/, and the data set's own when it fails) are removed."""
  fresh = not builder.is_prepared()
  if fresh and not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"--manual_dir={manual_dir}: no such folder; give the folder of the "
                            "downloaded data set (see the builder's docstring for its layout)")
  if fresh:
    try:
      builder.inputs = builder.find_inputs(manual_dir)
      # What a preparation that was killed left (tfds removes its folder only on an exception).
      for stale in epath.Path(builder.data_path).parent.glob(f"incomplete.*_{builder.version}"):
        logging.warning("removing %s, left by a preparation that stopped", stale)
        stale.rmtree()
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    finally:
      if builder.pool is not None:
        builder.pool.shutdown(cancel_futures=True)
      version = epath.Path(builder.data_path)  # DATA_DIR/<name>/<variant>/<version>
      root = version.parents[2]
      _remove_empty(root / "downloads" / "extracted", root / "downloads", version.parent,
                    version.parents[1])
  else:
    logging.warning("%s is already prepared: delete it to prepare again", builder.data_path)
  return {k: v for k, v in builder.info.metadata.items()}, fresh
