"""Prepares AffectNet: face crops, labels and valence/arousal as an ArrayRecord tfds data set.

  python tools/prepare_affectnet.py --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
      [--image_size=140] [--margin=0.1] [--num_workers=<cores>] [--image_root=...]

Logs progress every 10 s and prints a report at the end: examples written per split, rows
skipped per reason with a few CSV lines quoted (also kept in the data set's metadata.json).
The result lands in DATA_DIR/affectnet/<size>px_margin<margin>/1.0.0 (written to a temporary
folder renamed when complete); a variant already there is left alone. A run that stops (Ctrl-C,
killed, a full disk) keeps the crops made so far in DATA_DIR/affectnet_spill_<variant>_<hash>/:
the same command again resumes from them. Read it with
avemo_jax.data.affectnet.source(DATA_DIR, "train"|"test", num_classes=8|7, ...).
"""
import os
import sys

from absl import flags

from avemo_jax import cli
from avemo_jax.data import affectnet, tfds_common

__doc__ += "\n" + affectnet.__doc__  # --help shows where the files go

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the downloaded AffectNet files.",
                                  required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where prepared data sets live.", required=True)
_IMAGE_ROOT = flags.DEFINE_string(
    "image_root", None, "Folder holding the numbered image subfolders (default: found under "
    "--manual_dir).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 140, "Side of the stored square crops (pixels).")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Crop side = box side * (1 + 2 * margin).")
_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored crops.")
_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                "Processes decoding and cropping images (0: none).")


def main(argv):
  del argv
  report, fresh = affectnet.prepare(
      _MANUAL_DIR.value, _DATA_DIR.value, image_size=_IMAGE_SIZE.value, margin=_MARGIN.value,
      jpeg_quality=_QUALITY.value, image_root=_IMAGE_ROOT.value, num_workers=_WORKERS.value)
  print(("Prepared" if fresh else "Already prepared (report of that run)") + ":")
  print(tfds_common.format_report(report))
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
