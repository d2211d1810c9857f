"""Prepares RECOLA (AVEC 2016): per 40 ms frame a face crop, valence/arousal and the audio.

  python tools/prepare_recola.py --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
      [--image_size=140] [--margin=0.1] [--num_workers=<cores>] [--detect_every=1]
      [--smooth=0] [--min_face=0.1] [--max_side=480] [--rolls=15,-15] ...

All ARFFs and media headers are checked first (seconds): any problem stops the run before it
starts, with every bad file (and row) listed. Recordings are then decoded, tracked and cropped in
parallel (one worker process per recording; a 300 s recording is 7,501 frames), written as they
stream. Progress (frames, frames/s, ETA) is logged every 10 s; the final report gives per split
the recordings and frames written, frames without a detected face (the last face box carried),
what was trimmed to align labels, video and audio, recordings skipped and why, and frames/s (also
kept in the data set's metadata.json). The result lands in
DATA_DIR/recola/<size>px_margin<margin>/1.0.0. Read it with
avemo_jax.data.recola.source(DATA_DIR, "train"|"dev", ...) or .clips(...).

Speed: the face detector dominates (~80 ms a frame on one core at the default --min_face=0.1).
Measured on 2 busy cores with 2 workers, 640x480 and 1280x720 video: ~20 frames/s with the
defaults (the 135,018 frames of RECOLA's train and dev: ~1.9 h), ~80 frames/s with
--detect_every=5 (~30 min), ~63 frames/s with --min_face=0.2 when faces span at least a fifth of
the frame height (~36 min). More cores: one worker per core, up to one per recording.
"""
import os
import sys

from absl import flags

import detector_flags

from avemo_jax import cli
from avemo_jax.data import recola

__doc__ += "\n" + recola.__doc__  # --help shows where the files go

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with recordings_audio/, "
                                  "recordings_video/ and ratings_gold_standard/.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where prepared data sets live.", required=True)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 140, "Side of the stored square crops (pixels).")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Crop side = box side * (1 + 2 * margin).")
_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored crops.")
_WORKERS = flags.DEFINE_integer("num_workers", min(os.cpu_count() or 1, 18),
                                "Processes, each preparing one recording at a time (0: none).")
_DETECT_EVERY = flags.DEFINE_integer("detect_every", 1, "Run the face detector on every n-th "
                                     "frame only, carrying the box in between (speed).")
_SMOOTH = flags.DEFINE_float("smooth", 0.0, "0 follows each detection; a in (0, 1) keeps "
                             "a * previous box + (1 - a) * detection (steadier crops).")
flags.adopt_module_key_flags(detector_flags)  # in --help


def main(argv):
  del argv
  detector = detector_flags.options()
  report, fresh = recola.prepare(
      _MANUAL_DIR.value, _DATA_DIR.value, image_size=_IMAGE_SIZE.value, margin=_MARGIN.value,
      jpeg_quality=_QUALITY.value, num_workers=_WORKERS.value, detect_every=_DETECT_EVERY.value,
      smooth=_SMOOTH.value, detector_options=detector)
  print(("Prepared" if fresh else "Already prepared (report of that run)") + ":")
  print(recola.format_report(report))
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
