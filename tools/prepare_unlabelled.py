"""Prepares a folder of unlabelled face images: the largest face of each, cropped, as ArrayRecord.

  python tools/prepare_unlabelled.py --manual_dir=FOLDER --data_dir=DATA_DIR
      [--image_size=140] [--margin=0.1] [--num_workers=<cores>] [--min_face=0.1] ...

Logs progress every 10 s and prints a report at the end: images found, faces written, images
skipped per reason (unreadable, no face found) with a few named (also kept in the data set's
metadata.json). The result lands in DATA_DIR/unlabelled_faces/<size>px_margin<margin>/1.0.0.
Read it with avemo_jax.data.unlabelled.source(DATA_DIR, ...).
"""
import os
import sys

from absl import flags

import detector_flags

from avemo_jax import cli
from avemo_jax.data import unlabelled

__doc__ += "\n" + unlabelled.__doc__

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The folder of face images (searched "
                                  "recursively).", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where prepared data sets live.", required=True)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 140, "Side of the stored square crops (pixels).")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Crop side = box side * (1 + 2 * margin).")
_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored crops.")
_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                "Processes decoding images and detecting faces (0: none).")
flags.adopt_module_key_flags(detector_flags)  # in --help


def main(argv):
  del argv
  detector = detector_flags.options()
  report, fresh = unlabelled.prepare(
      _MANUAL_DIR.value, _DATA_DIR.value, image_size=_IMAGE_SIZE.value, margin=_MARGIN.value,
      jpeg_quality=_QUALITY.value, num_workers=_WORKERS.value, detector_options=detector)
  print(("Prepared" if fresh else "Already prepared (report of that run)") + ":")
  print(unlabelled.format_report(report))
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
