"""Prepares Google FEC: triplets of face crops with all six annotations, as ArrayRecord.

  python tools/prepare_fec.py --manual_dir=MANUAL_DIR --list_urls=urls.txt   # then download
  python tools/prepare_fec.py --manual_dir=MANUAL_DIR --data_dir=DATA_DIR
      [--image_size=140] [--margin=0.1] [--num_workers=<cores>] [--image_dir=...]

Images live in MANUAL_DIR/images (or --image_dir), each under the basename of its URL's path.
Logs progress every 10 s and prints a report at the end: triplets written, skipped per reason
(missing images, unreadable images, no majority, malformed lines, bad boxes) with a few CSV
lines quoted, and the numbers of distinct images referenced and missing (also kept in the data
set's metadata.json). The result lands in DATA_DIR/fec/<size>px_margin<margin>/1.0.0. A run
that stops (Ctrl-C, killed, a full disk) keeps the crops made so far in
DATA_DIR/fec_spill_<variant>_<hash>/: the same command again resumes from them. Read it with
avemo_jax.data.fec.source(DATA_DIR, "train"|"test", ...).
"""
import collections
import os
import sys

from absl import app, flags

from avemo_jax import cli
from avemo_jax.data import fec, tfds_common

__doc__ += "\n" + fec.__doc__  # --help shows where the files go

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the FEC CSVs and images/.",
                                  required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where prepared data sets live.")
_LIST_URLS = flags.DEFINE_string("list_urls", None, "Write every distinct image URL to this file "
                                 "(one a line, for downloading) and exit.")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Image folder (default MANUAL_DIR/images).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 140, "Side of the stored square crops (pixels).")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Crop side = box side * (1 + 2 * margin).")
_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored crops.")
_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                "Processes decoding and cropping images (0: none).")


def _list_urls(path: str) -> None:
  urls = fec.list_urls(_MANUAL_DIR.value)
  with open(path, "w") as f:
    f.writelines(u + "\n" for u in urls)
  names = collections.Counter(fec.image_name(u) for u in urls)
  print(f"{len(urls)} distinct image URLs written to {path}")
  shared = [n for n, c in names.items() if c > 1]
  if shared:  # e.g. one Flickr photo on two farm servers: the same file serves both
    print(f"{len(shared)} file names are shared by several URLs (e.g. {shared[:3]}); one "
          "downloaded file serves all of them")


def main(argv):
  del argv
  if _LIST_URLS.value:
    _list_urls(_LIST_URLS.value)
    return
  if not _DATA_DIR.value:
    raise app.UsageError("--data_dir is required (or --list_urls)")
  report, fresh = fec.prepare(
      _MANUAL_DIR.value, _DATA_DIR.value, image_size=_IMAGE_SIZE.value, margin=_MARGIN.value,
      jpeg_quality=_QUALITY.value, image_dir=_IMAGE_DIR.value, num_workers=_WORKERS.value)
  print(("Prepared" if fresh else "Already prepared (report of that run)") + ":")
  print(tfds_common.format_report(report))
  sys.stdout.flush()


if __name__ == "__main__":
  cli.run(main)
