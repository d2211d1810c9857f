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

from absl import app, flags

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
_CASCADE = flags.DEFINE_string("cascade", "haarcascade_frontalface_alt2.xml",
                               "OpenCV cascade: a file in cv2.data.haarcascades, or a path.")
_MIN_FACE = flags.DEFINE_float("min_face", 0.1, "Smallest face side searched, as a fraction of "
                               "the image's shorter side (larger is faster).")
_MAX_SIDE = flags.DEFINE_integer("max_side", 480, "Images are shrunk to this longer side for "
                                 "detection (smaller is faster); crops come from the full image.")
_SCALE_FACTOR = flags.DEFINE_float("scale_factor", 1.1, "Detector scale step.")
_MIN_NEIGHBORS = flags.DEFINE_integer("min_neighbors", 4, "Detector: raw hits a face needs.")
_ROLLS = flags.DEFINE_list("rolls", ["15", "-15"], "Head tilts (degrees) also searched in images "
                           "without an upright face (empty: none; each costs a pass).")


def main(argv):
  del argv
  detector = dict(cascade=_CASCADE.value, min_face=_MIN_FACE.value, max_side=_MAX_SIDE.value,
                  scale_factor=_SCALE_FACTOR.value, min_neighbors=_MIN_NEIGHBORS.value,
                  rolls=tuple(float(r) for r in _ROLLS.value))
  report, fresh = unlabelled.prepare(
      _MANUAL_DIR.value, _DATA_DIR.value, image_size=_IMAGE_SIZE.value, margin=_MARGIN.value,
      jpeg_quality=_QUALITY.value, num_workers=_WORKERS.value, detector_options=detector)
  print(("Prepared" if fresh else "Already prepared (report of that run)") + ":")
  print(unlabelled.format_report(report))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
