"""Google FEC (facial expression comparison) as a tfds builder with `manual_dir`, and its reader.

What to download and where to put it, under one folder MANUAL_DIR:

  MANUAL_DIR/faceexp-comparison-data-{train,test}-public.csv   (or in FEC_dataset/, as unzipped)
  MANUAL_DIR/images/<basename of the URL's path>, e.g. the image of
      http://farm4.staticflickr.com/3679/9370232143_2b1d8bc3a7_b.jpg is
      MANUAL_DIR/images/9370232143_2b1d8bc3a7_b.jpg
  python tools/prepare_fec.py --manual_dir=MANUAL_DIR --list_urls=urls.txt   # every image URL
  wget -nc -i urls.txt -P MANUAL_DIR/images   # saves each URL under its basename; dead ones fail
  python tools/prepare_fec.py --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

CSV (no header, 28 columns): for each of 3 faces its URL and box as fractions of the image
(left, right, top, bottom); the triplet type (ONE_/TWO_/THREE_CLASS_TRIPLET); 6 x (annotator id,
label 1-3 = the face most different from the other two). Our label (0-2) is the face named by
most of the six; a tie for most (3-3 or 2-2-2) has no such face: the triplet is skipped and
counted as "no majority". All six annotations are kept. Faces are cropped like AffectNet's
(tfds_common: square, margin, edge padding, resize) and stored as JPEG.

Many URLs are dead: triplets with a missing image are skipped and counted, and the report gives
the number of distinct image files referenced (by rows that parse) and missing. A file that is not a JPEG (what a
dead Flickr link may serve instead) counts as an unreadable image. Malformed lines, boxes outside
[0, 1] and unreadable images are skipped and counted too, with a few lines quoted.

Crops are journaled in DATA_DIR/fec_spill_<variant>_<settings>/ as they are made (removed once
the data set is written): a preparation that stops (Ctrl-C, killed, a full disk) resumes there,
and the same command again crops only the faces not done before (or whose image changed; a face
whose image was missing is looked for again).
"""
import os
import pathlib
import posixpath
import urllib.parse
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from avemo_jax.data import spill, tfds_common
from avemo_jax.data.synthetic import TRIPLET_TYPES

NUM_COLUMNS = 28
CSVS = {"train": "faceexp-comparison-data-train-public.csv",
        "test": "faceexp-comparison-data-test-public.csv"}
_CSV_DIRS = (".", "FEC_dataset")
_PROBE_ROWS = 300  # rows checked for existing images before a long run starts


class Triplet(NamedTuple):
  urls: tuple[str, str, str]
  boxes: tuple[tuple[float, float, float, float], ...]  # x0, y0, x1, y1 as fractions
  triplet_type: int  # index in TRIPLET_TYPES
  annotators: tuple[str, ...]
  votes: tuple[int, ...]  # per annotator: the odd face, 0-2
  label: int  # the face named most often


def image_name(url: str) -> str:
  """The file name of a URL's image under MANUAL_DIR/images: the basename of its path."""
  return posixpath.basename(urllib.parse.urlsplit(url.strip()).path)


def _parse(fields: list[str]) -> Triplet | tfds_common.Skip:
  """The triplet of a CSV row, or why it is unusable."""
  bad = lambda reason, detail: tfds_common.Skip(reason, detail, "")
  if len(fields) != NUM_COLUMNS:
    return bad("malformed line", f"{len(fields)} columns, expected {NUM_COLUMNS}")
  urls = tuple(fields[i].strip() for i in (0, 5, 10))
  if not all(image_name(u) for u in urls):
    return bad("malformed line", f"a URL without a file name in {urls}")
  try:
    boxes = [[float(v) for v in fields[5 * i + 1:5 * i + 5]] for i in range(3)]
    votes = tuple(int(fields[i]) - 1 for i in range(17, NUM_COLUMNS, 2))
  except ValueError as e:
    return bad("malformed line", str(e))
  kind = fields[15].strip()
  if kind not in TRIPLET_TYPES or not all(0 <= v <= 2 for v in votes):
    return bad("malformed line", f"triplet type {kind!r}, labels {[v + 1 for v in votes]}")
  for left, right, top, bottom in boxes:
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
      return bad("bad box", f"left, right, top, bottom = {left}, {right}, {top}, {bottom}")
  counts = np.bincount(votes, minlength=3)
  if (counts == counts.max()).sum() > 1:
    return bad("no majority", f"labels {[v + 1 for v in votes]}")
  return Triplet(urls, tuple((b[0], b[2], b[1], b[3]) for b in boxes), TRIPLET_TYPES.index(kind),
                 tuple(fields[i].strip() for i in range(16, NUM_COLUMNS, 2)), votes,
                 int(counts.argmax()))


def find_csvs(manual_dir) -> dict[str, pathlib.Path]:
  """The two CSVs under `manual_dir`, or an error saying where they belong."""
  return tfds_common.find_csvs(manual_dir, CSVS, _CSV_DIRS, "unzip the FEC release there")


def find_inputs(manual_dir, image_dir=None) -> tuple[dict[str, pathlib.Path], pathlib.Path]:
  """The two CSVs and the image folder, or an error saying what is missing."""
  csvs = find_csvs(manual_dir)
  images = pathlib.Path(image_dir) if image_dir else pathlib.Path(manual_dir) / "images"
  if image_dir and not images.is_dir():
    raise FileNotFoundError(f"no image folder --image_dir={image_dir}: pass the folder of the "
                            "downloaded images")
  if not images.is_dir():
    raise FileNotFoundError(f"no image folder {images}: download the images there, each under "
                            "the basename of its URL (see tools/prepare_fec.py --help), or pass "
                            "--image_dir")
  for path in csvs.values():
    tfds_common.check_images_exist(
        path, [images / image_name(u)
               for _, (_, f) in zip(range(_PROBE_ROWS), tfds_common.csv_rows(path))
               if isinstance(t := _parse(f), Triplet) for u in t.urls],
        f"download them into {images}, each named by the basename of its URL, or pass "
        "--image_dir")
  return csvs, images


def _scan(path: pathlib.Path) -> int:
  """The lines of a CSV, read through before any split is written: a CSV with no usable row
  is refused here, not after hours of another split."""
  lines = usable = 0
  for lines, fields in tfds_common.csv_rows(path):
    usable += isinstance(_parse(fields), Triplet)
  if not usable:
    raise ValueError(f"{path}: no usable triplet in its {lines} lines: is it the FEC release's "
                     f"CSV ({NUM_COLUMNS} columns)?")
  return lines


class Fec(tfds.core.GeneratorBasedBuilder):
  """FEC triplets: three face crops, the odd face, triplet type, six annotations."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)  # tfds cannot locate files of a namespace package

  def __init__(self, *, image_dir: str | None = None, num_workers: int = 0, **kwargs):
    self._image_dir, self.pool = image_dir, tfds_common.make_pool(num_workers)
    self.window, self.spill = 2 * num_workers, None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    tensor = lambda shape, dtype, doc: tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc)
    return tfds_common.DatasetInfo(
        builder=self, metadata=tfds.core.MetadataDict(),
        features=tfds.features.FeaturesDict({
            "images": tensor((3,), np.object_, "JPEG bytes of the three square face crops"),
            "label": tensor((), np.int32, "0-2: the face most annotators named most different"),
            "triplet_type": tensor((), np.int32, "0 one-class, 1 two-class, 2 three-class"),
            "annotations": tensor((6,), np.int32, "each annotator's odd face, 0-2"),
            "annotators": tensor((6,), np.object_, "annotator ids as in the CSV"),
            "line": tensor((), np.int32, "line of the row in the CSV"),
            "urls": tensor((3,), np.object_, "the three image URLs"),
        }))

  def find_inputs(self, manual_dir) -> tuple[dict[str, pathlib.Path], pathlib.Path]:
    return find_inputs(manual_dir, self._image_dir)

  def _split_generators(self, dl_manager):
    csvs, images = self.inputs  # tfds_common.prepare's find_inputs
    self.spill = spill.crop_folder(self, csvs.values(), images)
    reports = {s: tfds_common.SplitReport(p.name, _scan(p)) for s, p in csvs.items()}
    return {s: self._generate_examples(p, images, s, reports[s]) for s, p in csvs.items()}

  def _generate_examples(self, csv_path, images, split: str, report: tfds_common.SplitReport):
    referenced, missing = set(), set()

    def rows():
      for line, fields in tfds_common.csv_rows(csv_path):
        t = _parse(fields)
        if isinstance(t, tfds_common.Skip):
          report.skip(t.reason, line, t.detail)
          continue
        paths = [os.fspath(images / image_name(u)) for u in t.urls]
        referenced.update(paths)
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
          missing.update(absent)
          report.skip("missing image", line, f"{os.path.basename(absent[0])} (from the URL "
                      f"{t.urls[paths.index(absent[0])]})")
          continue
        yield line, t, _jobs(t, images)

    # A face serves ~10 triplets: each is cropped once, into the split's journal (the real set's
    # crops are ~1.5 GB; kept if this fails, for the next run), then the triplets read from it.
    what = f"fec {csv_path.name}"
    with spill.CropJournal(os.path.join(self.spill, f"{split}.crops"), what) as faces:
      distinct = tfds_common.crop_distinct(  # the faces of every row that parses
          self, (job for _, f in tfds_common.csv_rows(csv_path)
                 if isinstance(t := _parse(f), Triplet) for job in _jobs(t, images)),
          faces, f"{what}, cropping each distinct face")
      progress = tfds_common.Progress(what, report.lines)
      for line, t, jobs in rows():
        progress.update(line, report)
        crops = [faces[j] for j in jobs]
        failed = [c for c in crops if isinstance(c, tfds_common.Skip)]
        if failed:  # the first face that failed, as tfds_common.crop_rows reports a row
          report.skip(failed[0].reason, line,
                      f"{os.path.relpath(failed[0].path, images)}: {failed[0].detail}")
          continue
        report.written[split] += 1
        yield line, {"images": crops, "label": t.label, "triplet_type": t.triplet_type,
                     "annotations": list(t.votes), "annotators": list(t.annotators),
                     "line": line, "urls": list(t.urls)}
      progress.update(report.lines, report, force=True)
    report.extra.update({"distinct images referenced": len(referenced),
                         "distinct images missing": len(missing),
                         "distinct faces referenced": distinct})
    self.info.metadata[split] = report.as_dict()
    tfds_common.check_written(report, split)


def _jobs(t: Triplet, images: pathlib.Path) -> tuple[tfds_common.Job, ...]:
  """The crops of a triplet's three faces."""
  return tuple(tfds_common.Job(os.fspath(images / image_name(u)), b, fractional=True,
                               jpeg_only=_is_jpeg_url(u)) for u, b in zip(t.urls, t.boxes))


def _is_jpeg_url(url: str) -> bool:
  return image_name(url).lower().endswith((".jpg", ".jpeg"))


def list_urls(manual_dir) -> list[str]:
  """Every distinct image URL of both CSVs, in order of first use (to download them)."""
  urls = {}
  for path in find_csvs(manual_dir).values():
    for _, fields in tfds_common.csv_rows(path):
      if len(fields) == NUM_COLUMNS:
        urls.update((fields[i].strip(), None) for i in (0, 5, 10))
  return list(urls)


def prepare(manual_dir, data_dir, *, image_size: int = 140, margin: float = 0.1,
            jpeg_quality: int = 95, image_dir: str | None = None, num_workers: int = 0
            ) -> tuple[dict, bool]:
  """Builds DATA_DIR/fec/<config> from MANUAL_DIR; returns (report, newly prepared)."""
  builder = Fec(config=tfds_common.crop_config(image_size, margin, jpeg_quality),
                data_dir=data_dir, file_format="array_record", image_dir=image_dir,
                num_workers=num_workers)
  return spill.prepare(builder, manual_dir)


class Triplets(tfds_common.Records):
  """Random access to prepared triplets: {"images" uint8 [3, S, S, 3], "label" int32 (0-2, the
  odd face), "triplet_type" int32 (0-2), "annotations" int32 [6] (each annotator's odd face)}."""

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    r = self._records[index]
    return {"images": np.stack([tfds_common.decode_jpeg(b) for b in r["images"]]),
            "label": np.int32(r["label"]), "triplet_type": np.int32(r["triplet_type"]),
            "annotations": np.asarray(r["annotations"], np.int32)}


def source(data_dir, split: str, *, image_size: int = 140, margin: float = 0.1) -> Triplets:
  """Prepared triplets of split "train" or "test"."""
  if split not in CSVS:
    raise ValueError(f"split={split!r}: expected one of {tuple(CSVS)}")
  config = tfds_common.crop_config(image_size, margin)
  return Triplets(tfds_common.data_source(Fec, config, split, data_dir, "prepare_fec.py"))
