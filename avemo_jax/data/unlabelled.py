"""A folder of unlabelled face images (for distillation) as a tfds builder, and its reader.

  python tools/prepare_unlabelled.py --manual_dir=FOLDER --data_dir=DATA_DIR

FOLDER is searched recursively for .jpg, .jpeg, .png, .bmp and .webp files (any case; other
files are ignored). In each image OpenCV's face detector (`faces.FaceDetector`) looks for faces;
the largest one is cropped as a square around its box enlarged by `margin` per side (edge-padded
outside the image, `faces.crop`), resized to `image_size` and stored as JPEG. Images that cannot
be decoded and images without a face are skipped and counted, with a few named in the report.

Stored: DATA_DIR/unlabelled_faces/<size>px_margin<m>/1.0.0 (ArrayRecord), split "train", one
example per image in sorted path order: the crop, the image's path relative to FOLDER, the box
cropped and the number of faces found. The report is in metadata.json.
"""
import functools
import os
import pathlib
import time
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from avemo_jax.data import faces, tfds_common

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_images(folder) -> list[str]:
  """Paths of the image files under `folder` (recursive), relative to it, sorted."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such folder; --manual_dir must be the folder of images")
  found = []
  for parent, dirs, files in os.walk(root, followlinks=True):
    dirs.sort()
    found += [os.path.relpath(os.path.join(parent, f), root) for f in sorted(files)
              if f.lower().endswith(EXTENSIONS)]
  return found


def _printable(text: str) -> str:
  """`text` with the bytes of a file name that is not UTF-8 (an old zip's) as \\x escapes."""
  return os.fsencode(text).decode("utf-8", "backslashreplace")


class Face(NamedTuple):
  jpeg: bytes
  box: np.ndarray  # x, y, w, h float32 in image pixels
  num_faces: int


def crop_largest_face(path: str, *, detector: faces.FaceDetector, size: int, margin: float,
                      jpeg_quality: int) -> Face | tfds_common.Skip:
  """The largest detected face of the image at `path`, cropped, or why there is none."""
  try:
    image = faces.load_image(path)
  except (ValueError, FileNotFoundError) as e:
    return tfds_common.Skip("unreadable image", str(e), path)
  found = detector.detect(image)
  if not len(found):
    return tfds_common.Skip("no face found", f"{path}: the detector found no face", path)
  box = found[np.argmax(found[:, 2] * found[:, 3]), :4]
  try:
    crop = faces.crop(image, box, margin=margin, size=size)
  except ValueError as e:  # a box of a tilted pass turned back outside the image
    return tfds_common.Skip("bad box", str(e), path)
  return Face(tfds_common.encode_jpeg(crop, jpeg_quality), box, len(found))


class UnlabelledFaces(tfds.core.GeneratorBasedBuilder):
  """Largest-face crops of a folder of images (see the module docstring)."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = epath.Path(__file__)  # tfds cannot locate files of a namespace package

  def __init__(self, *, num_workers: int = 0, detector_options: dict | None = None, **kwargs):
    self.pool, self.window = tfds_common.make_pool(num_workers), 2 * num_workers
    self.detector_options = dict(detector_options or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    tensor = lambda shape, dtype, doc: tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc)
    return tfds_common.DatasetInfo(
        builder=self, metadata=tfds.core.MetadataDict(),
        features=tfds.features.FeaturesDict({
            "image": tensor((), np.object_, "JPEG bytes of the square crop of the largest face"),
            "file": tensor((), np.object_, "the image's path relative to the folder"),
            "box": tensor((4,), np.float32, "x, y, w, h of the detected face in image pixels"),
            "num_faces": tensor((), np.int32, "faces the detector found in the image"),
        }))

  def find_inputs(self, manual_dir) -> list[str]:
    """`find_images`, or an error if there are none."""
    files = find_images(manual_dir)
    if not files:
      raise FileNotFoundError(f"no image files ({', '.join(EXTENSIONS)}) under --manual_dir="
                              f"{manual_dir}: point it at the folder of face images")
    return files

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    return {"train": self._generate_examples(root, self.inputs)}  # tfds_common.prepare's

  def _generate_examples(self, root: pathlib.Path, files: list[str]):
    detector = faces.FaceDetector(**self.detector_options)
    config = self.builder_config
    crop = functools.partial(crop_largest_face, detector=detector, size=config.size,
                             margin=config.margin, jpeg_quality=config.jpeg_quality)
    written, skipped, examples = 0, {}, {}
    start = last = time.monotonic()
    paths = (os.fspath(root / f) for f in files)
    results = tfds_common.parallel_map(crop, paths, self.pool, window=self.window, chunk=16)
    for i, (file, result) in enumerate(zip(files, results)):
      if isinstance(result, tfds_common.Skip):
        skipped[result.reason] = skipped.get(result.reason, 0) + 1
        if len(examples.setdefault(result.reason, [])) < tfds_common.MAX_EXAMPLES:
          examples[result.reason].append(_printable(result.detail))
      else:
        written += 1
        yield i, {"image": result.jpeg, "box": result.box,
                  "file": _printable(file),
                  "num_faces": result.num_faces}
      if time.monotonic() - last >= 10.0 or i + 1 == len(files):
        last, rate = time.monotonic(), (i + 1) / max(time.monotonic() - start, 1e-9)
        logging.info("unlabelled faces: image %d/%d, %d written, %d skipped, %.0f images/s, "
                     "ETA %.1f min", i + 1, len(files), written, sum(skipped.values()), rate,
                     (len(files) - i - 1) / rate / 60)
    seconds = time.monotonic() - start
    self.info.metadata["train"] = {
        "source": os.fspath(root), "images": len(files), "written": written, "skipped": skipped,
        "examples": examples, "seconds": round(seconds, 1),
        "images_per_s": round(len(files) / max(seconds, 1e-9), 1),
        "detector": detector.__getstate__()}
    if not written:
      raise ValueError(f"no face in any of the {len(files)} images under {root}; skipped: "
                       f"{skipped}, e.g. {[e for v in examples.values() for e in v][:3]}")


def prepare(manual_dir, data_dir, *, image_size: int = 140, margin: float = 0.1,
            jpeg_quality: int = 95, num_workers: int = 0,
            detector_options: dict | None = None) -> tuple[dict, bool]:
  """Builds DATA_DIR/unlabelled_faces/<config> from the image folder MANUAL_DIR; returns
  (report, newly prepared). `detector_options` are `faces.FaceDetector` arguments."""
  builder = UnlabelledFaces(config=tfds_common.crop_config(image_size, margin, jpeg_quality),
                            data_dir=data_dir, file_format="array_record",
                            num_workers=num_workers, detector_options=detector_options)
  return tfds_common.prepare(builder, manual_dir)


def format_report(report: dict[str, Any]) -> str:
  r = report["train"]
  lines = [f"train ({r['source']}, {r['images']} image files): written {r['written']}, skipped "
           f"{sum(r['skipped'].values())}; {r['images_per_s']:g} images/s"]
  for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
    lines.append(f"  skipped {n:>8}  {reason}")
    lines.extend(f"      e.g. {e}" for e in r["examples"].get(reason, []))
  return "\n".join(lines)


class Faces(tfds_common.Records):
  """Random access to prepared unlabelled faces: {"image" uint8 [S, S, 3]}."""

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": tfds_common.decode_jpeg(self._records[index]["image"])}


def source(data_dir, *, image_size: int = 140, margin: float = 0.1) -> Faces:
  """The prepared faces (the variant made with these crop settings)."""
  config = tfds_common.crop_config(image_size, margin)
  return Faces(tfds_common.data_source(UnlabelledFaces, config, "train", data_dir,
                                       "prepare_unlabelled.py"))
