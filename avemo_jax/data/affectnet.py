"""AffectNet (manually annotated images) as a tfds builder with `manual_dir`, and its reader.

What to download (licensed: request access at http://mohammadmahoor.com/affectnet/) and where
to put it, under one folder MANUAL_DIR:

  MANUAL_DIR/training.csv, MANUAL_DIR/validation.csv    (or in Manually_Annotated_file_lists/)
  MANUAL_DIR/Manually_Annotated_Images/<subDirectory_filePath>
      (or Manually_Annotated/Manually_Annotated_Images/..., or any folder given as --image_root)
  python tools/prepare_affectnet.py --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

CSV columns: subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks,
expression, valence, arousal (a header line; one without it is read too). Each face is cropped as
a square around its box enlarged by `margin` per side, edge-padded outside the image, resized to
`image_size` and stored as JPEG (see tfds_common for the measured sizes and speeds).

Stored splits (DATA_DIR/affectnet/<size>px_margin<m>/1.0.0, ArrayRecord): train_7class and
validation_7class hold codes 0-6, train_contempt and validation_contempt code 7 (Contempt), so
that 8 classes read "train_7class+train_contempt" and 7 classes "train_7class" without storing
anything twice (a CSV without Contempt rows, like the 7-class validation list, gets no contempt
split, and its 8-class read is its 7-class split). Validation is the test set. Valence/arousal
-2 ("invalid") or outside [-1, 1] are kept as 0 with va_valid=False. Skipped and counted (with quoted lines) in the report: codes
8 None / 9 Uncertain / 10 No-Face, other codes, malformed lines, missing or unreadable images,
boxes outside the image.

Crops are journaled in DATA_DIR/affectnet_spill_<variant>_<settings>/ as they are made (removed
once the data set is written): a preparation that stops (Ctrl-C, killed, a full disk) resumes
there, and the same command again crops only the faces not done before (or whose image changed).
"""
import collections
import math
import os
import pathlib
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from avemo_jax.data import spill, tfds_common

HEADER = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
          "facial_landmarks", "expression", "valence", "arousal")
EXPRESSIONS = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
               "None", "Uncertain", "No-Face")
CONTEMPT = 7
_CSVS = {"train": "training.csv", "validation": "validation.csv"}
_CSV_DIRS = (".", "Manually_Annotated_file_lists")
_IMAGE_ROOTS = ("Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images")
_PROBE_ROWS = 200  # rows checked for existing images before a long run starts


class Row(NamedTuple):
  file: str  # subDirectory_filePath
  box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
  code: int
  valence: float
  arousal: float


def _parse(fields: list[str]) -> Row | tfds_common.Skip:
  """The row, or why it is unusable."""
  bad = lambda reason, detail: tfds_common.Skip(reason, detail, "")
  if len(fields) != len(HEADER):
    return bad("malformed line", f"{len(fields)} columns, expected {len(HEADER)}")
  try:
    x, y, w, h = (float(v) for v in fields[1:5])
    code = int(fields[6])
    valence, arousal = float(fields[7]), float(fields[8])
  except ValueError as e:
    return bad("malformed line", str(e))
  if not 0 <= code < len(EXPRESSIONS):
    return bad("expression code out of range (0-10)", f"expression={code}")
  if code > CONTEMPT:
    return bad(f"expression {code} ({EXPRESSIONS[code]})", "not one of the 8 classes")
  if not (all(map(math.isfinite, (x, y, w, h))) and w > 0 and h > 0 and fields[0]):
    return bad("bad box", f"face box {x},{y},{w},{h}, file {fields[0]!r}")
  return Row(fields[0], (x, y, x + w, y + h), code, valence, arousal)


def _rows(path: pathlib.Path):
  """(line number, fields) of the data rows; a header line is checked and dropped."""
  for line, fields in tfds_common.csv_rows(path):
    if line == 1 and tuple(fields) == HEADER:
      continue
    first = _parse(fields) if line == 1 else None
    if isinstance(first, tfds_common.Skip) and first.reason == "malformed line":
      raise ValueError(
          f"{path} line 1: not an AffectNet manual-annotation CSV (expected the header "
          f"{','.join(HEADER)} or a data row, got {fields[:3]}...): point --manual_dir at the "
          "folder that holds training.csv and validation.csv")
    yield line, fields


def find_inputs(manual_dir, image_root=None) -> tuple[dict[str, pathlib.Path], pathlib.Path]:
  """The two CSVs and the image folder under `manual_dir`, or an error saying what is missing."""
  manual_dir = pathlib.Path(manual_dir)
  csvs = tfds_common.find_csvs(manual_dir, _CSVS, _CSV_DIRS,
                               "put AffectNet's manual-annotation CSVs there")
  roots = [pathlib.Path(image_root)] if image_root else [manual_dir / r for r in _IMAGE_ROOTS]
  found = [r for r in roots if r.is_dir()]
  if image_root and not found:
    raise FileNotFoundError(f"no image folder --image_root={image_root}: pass the folder that "
                            "holds the numbered image subfolders")
  if not found:
    raise FileNotFoundError(f"no image folder: looked for {', '.join(map(str, roots))}; extract "
                            "Manually_Annotated_Images there or pass --image_root")
  root = found[0]
  for path in csvs.values():
    tfds_common.check_images_exist(
        path, [root / r.file for _, (_, f) in zip(range(_PROBE_ROWS), _rows(path))
               if isinstance(r := _parse(f), Row)],
        "pass --image_root=<the folder that holds the numbered subfolders>")
  return csvs, root


def _scan(path: pathlib.Path) -> tuple[int, collections.Counter]:
  """(lines, usable rows per part and skip reasons) of a CSV, read through before any split is
  written: a CSV with no usable row is refused here, not after hours of another split."""
  lines, counts = 0, collections.Counter()
  for lines, fields in _rows(path):
    row = _parse(fields)
    counts[row.reason if isinstance(row, tfds_common.Skip) else
           "contempt" if row.code == CONTEMPT else "7class"] += 1
  if not counts["7class"]:
    raise ValueError(f"{path}: no usable row of expressions 0-6 in its {lines} lines "
                     f"({dict(counts)}): is it AffectNet's manual-annotation CSV?")
  return lines, counts


class Affectnet(tfds.core.GeneratorBasedBuilder):
  """AffectNet face crops, labels 0-7 and valence/arousal (see the module docstring)."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)  # tfds cannot locate files of a namespace package

  def __init__(self, *, image_root: str | None = None, num_workers: int = 0, **kwargs):
    self._image_root, self.pool = image_root, tfds_common.make_pool(num_workers)
    self.window, self.spill = 2 * num_workers, None
    self.report: dict[str, tfds_common.SplitReport] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    scalar = lambda dtype, doc: tfds.features.Tensor(shape=(), dtype=dtype, doc=doc)
    return tfds_common.DatasetInfo(
        builder=self, metadata=tfds.core.MetadataDict(),
        features=tfds.features.FeaturesDict({
            "image": scalar(np.object_, "JPEG bytes of the square face crop"),
            "label": scalar(np.int32, "expression code 0-7 (" + ", ".join(EXPRESSIONS[:8]) + ")"),
            "valence": scalar(np.float32, "in [-1, 1]; 0 where va_valid is False"),
            "arousal": scalar(np.float32, "in [-1, 1]; 0 where va_valid is False"),
            "va_valid": scalar(np.bool_, "False where the CSV has -2 or a value outside [-1, 1]"),
            "line": scalar(np.int32, "line of the CSV row (the header is line 1)"),
            "file": scalar(np.object_, "subDirectory_filePath"),
        }))

  def find_inputs(self, manual_dir) -> tuple[dict[str, pathlib.Path], pathlib.Path]:
    return find_inputs(manual_dir, self._image_root)

  def _split_generators(self, dl_manager):
    csvs, root = self.inputs  # tfds_common.prepare's find_inputs
    self.spill = spill.crop_folder(self, csvs.values(), root)
    splits = {}
    for s, path in csvs.items():
      lines, counts = _scan(path)
      self.report[s] = tfds_common.SplitReport(path.name, lines)
      splits[f"{s}_7class"] = self._generate_examples(path, root, s, contempt=False)
      if counts["contempt"]:
        splits[f"{s}_contempt"] = self._generate_examples(path, root, s, contempt=True)
      else:  # e.g. the 7-class validation list: tfds writes no empty split
        self.report[s].notes["no Contempt rows: no contempt split"] += 1
        logging.warning("%s has no Contempt rows: no %s_contempt split", path, s)
    return splits

  def _generate_examples(self, csv_path, root, split: str, contempt: bool):
    report, part = self.report[split], "contempt" if contempt else "7class"

    def rows():
      for line, fields in _rows(csv_path):
        row = _parse(fields)
        if isinstance(row, tfds_common.Skip):
          if not contempt:  # rows outside both splits are counted once, in the 7-class pass
            report.skip(row.reason, line, row.detail)
        elif (row.code == CONTEMPT) == contempt:
          yield line, row, (tfds_common.Job(os.fspath(root / row.file), row.box),)

    what = f"affectnet {csv_path.name} ({part})"
    with spill.CropJournal(os.path.join(self.spill, f"{split}_{part}.crops"), what) as journal:
      for line, row, crops in tfds_common.crop_rows(self, rows(), journal, report, root, what):
        valid = -1 <= row.valence <= 1 and -1 <= row.arousal <= 1
        if not valid:
          report.notes["kept without valence/arousal (-2 or out of range)"] += 1
        report.written[f"{split}_{part}"] += 1
        yield line, {"image": crops[0], "label": row.code, "va_valid": valid,
                     "valence": row.valence if valid else 0.0,
                     "arousal": row.arousal if valid else 0.0, "line": line, "file": row.file}
    self.info.metadata[split] = report.as_dict()
    tfds_common.check_written(report, f"{split}_{part}")


def prepare(manual_dir, data_dir, *, image_size: int = 140, margin: float = 0.1,
            jpeg_quality: int = 95, image_root: str | None = None, num_workers: int = 0
            ) -> tuple[dict, bool]:
  """Builds DATA_DIR/affectnet/<config> from MANUAL_DIR; returns (report, newly prepared)."""
  builder = Affectnet(config=tfds_common.crop_config(image_size, margin, jpeg_quality),
                      data_dir=data_dir, file_format="array_record", image_root=image_root,
                      num_workers=num_workers)
  return spill.prepare(builder, manual_dir)


class Faces(tfds_common.Records):
  """Random access to prepared faces: {"image" uint8 [S, S, 3], "label" int32 (0-7; 0-6 when
  read as 7 classes), "valence", "arousal" float32, "va_valid" bool}."""

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    r = self._records[index]
    return {"image": tfds_common.decode_jpeg(r["image"]), "label": np.int32(r["label"]),
            "valence": np.float32(r["valence"]), "arousal": np.float32(r["arousal"]),
            "va_valid": np.bool_(r["va_valid"])}


def source(data_dir, split: str, *, num_classes: int = 8, image_size: int = 140,
           margin: float = 0.1) -> Faces:
  """Prepared faces of split "train" or "test" (AffectNet's validation set), 8 or 7 classes
  (7: Contempt left out; the other codes are the class indices either way)."""
  name = {"train": "train", "test": "validation", "validation": "validation"}.get(split)
  if name is None or num_classes not in (7, 8):
    raise ValueError(f"split={split!r} (train or test), num_classes={num_classes} (7 or 8)")
  config = tfds_common.crop_config(image_size, margin)
  return Faces(tfds_common.data_source(
      Affectnet, config, f"{name}_7class", data_dir, "prepare_affectnet.py",
      optional=() if num_classes == 7 else (f"{name}_contempt",)))
