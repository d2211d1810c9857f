"""What a preparation that stops (Ctrl-C, killed, a full disk) leaves for the next run: a spill
folder per variant and settings (`folder`), kept when the preparation fails and removed once the
data set is written (`prepare`); crops journaled into it as they are made (`CropJournal`,
AffectNet and FEC; RECOLA keeps a file per finished recording there)."""
import hashlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable
from typing import Any

from absl import logging
from etils import epath

from avemo_jax.data import tfds_common


def stamp(path) -> list[int] | None:
  """[size, mtime in ns] of a file (a file rewritten has another), or None if it is missing."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return [st.st_size, st.st_mtime_ns]


def folder(builder, settings: dict[str, Any]) -> str:
  """The folder (made here) where a preparation keeps its finished work, DATA_DIR/<name>_spill_
  <variant>_<hash of settings> (the system temp folder's when DATA_DIR is not local, e.g. gs://):
  the same command again resumes there; other settings or inputs get another folder."""
  key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  root = epath.Path(builder.data_path).parents[2]  # DATA_DIR/<name>/<variant>/<version>
  root = os.fspath(root) if os.path.isdir(root) else tempfile.gettempdir()
  path = os.path.join(root, f"{builder.name}_spill_{builder.builder_config.name}_{key}")
  os.makedirs(path, exist_ok=True)
  return path


def crop_folder(builder, csvs: Iterable, images) -> str:
  """`folder` for crops of the rows of `csvs` from `images`: the hash covers everything that
  changes a crop (crop settings, each CSV's path, size and mtime, the image folder)."""
  config = builder.builder_config
  return folder(builder, {"size": config.size, "margin": config.margin,
                          "quality": config.jpeg_quality,
                          "csvs": [[os.path.abspath(p), *stamp(p)] for p in csvs],
                          "images": os.path.abspath(images)})


# A record's head: lengths of its JSON and JPEG, and the CRC-32 of both, which tells a record
# cut short or garbled (a kill mid-write, a crash of the machine) from a whole one.
_HEAD = struct.Struct("<III")


def _key(job: tfds_common.Job) -> bytes:
  """A 16-byte digest of the job: AffectNet's 290k keys take ~35 MB of index, not ~150."""
  return hashlib.blake2b(json.dumps(job).encode(), digest_size=16).digest()


class CropJournal:
  """The results of crop jobs (JPEG bytes or Skip), appended to a file as they are made, so that
  a preparation which stops (killed, a full disk) resumes from them. A record is a `_HEAD`, JSON
  ({"key", "path", "stamp": its image's `stamp`, "skip"}) and the JPEG. Opened again, it indexes
  the records whose image is unchanged (their JPEGs stay on disk, read on demand) and cuts off a
  torn last record. A missing image's Skip is held in memory only: the file may be downloaded
  before the next run."""

  def __init__(self, path: str, what: str):
    self.path, self._index = path, {}  # key -> offset of its record, or a result not recorded
    skips = self._load() if os.path.exists(path) else 0
    if self._index:
      logging.info("%s: resuming from %d crops (%d of them skips) in %s", what,
                   len(self._index), skips, path)
    self._out, self._in = open(path, "ab"), open(path, "rb")

  def _load(self) -> int:
    """Indexes the file's records, truncated after its last whole one; returns the skips."""
    size, end, skips = os.path.getsize(self.path), 0, 0
    with open(self.path, "rb") as f:
      while end + _HEAD.size <= size:
        n_json, n_jpeg, crc = _HEAD.unpack(f.read(_HEAD.size))
        if end + _HEAD.size + n_json + n_jpeg > size:
          break
        body = f.read(n_json + n_jpeg)
        if not n_json or zlib.crc32(body) != crc:
          break
        record = json.loads(body[:n_json])
        if record["stamp"] == stamp(record["path"]):
          self._index[bytes.fromhex(record["key"])] = end
          skips += record["skip"] is not None
        end = f.tell()
    if end < size:
      logging.warning("%s: dropping its last %d bytes, a record cut short when a run stopped",
                      self.path, size - end)
      os.truncate(self.path, end)
    return skips

  def __contains__(self, job: tfds_common.Job) -> bool:
    return _key(job) in self._index

  def __getitem__(self, job: tfds_common.Job) -> bytes | tfds_common.Skip:
    where = self._index[_key(job)]
    if not isinstance(where, int):
      return where
    self._in.seek(where)  # the file only grows: what the reader buffered stays true
    n_json, n_jpeg, _ = _HEAD.unpack(self._in.read(_HEAD.size))
    skip = json.loads(self._in.read(n_json))["skip"]
    return tfds_common.Skip(*skip) if skip else self._in.read(n_jpeg)

  def add(self, job: tfds_common.Job, result: bytes | tfds_common.Skip) -> None:
    """Records `result`, written through at once: a kill loses nothing added before it."""
    key, image = _key(job), stamp(job.path)
    if image is None:  # a missing image: found again by the next run, as it may be there then
      self._index[key] = result
      return
    skip = isinstance(result, tfds_common.Skip)
    meta = json.dumps({"key": key.hex(), "path": job.path, "stamp": image,
                       "skip": list(result) if skip else None}).encode()
    jpeg = b"" if skip else result
    self._index[key] = self._out.tell()
    self._out.write(_HEAD.pack(len(meta), len(jpeg), zlib.crc32(jpeg, zlib.crc32(meta))) +
                    meta + jpeg)
    self._out.flush()

  def close(self) -> None:
    self._out.close()
    self._in.close()

  def __enter__(self) -> "CropJournal":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def prepare(builder, manual_dir) -> tuple[dict, bool]:
  """`tfds_common.prepare` for a builder that keeps its finished work in `builder.spill` (a
  `folder`): kept when the preparation fails, so that the same command again resumes from it
  (removed if it holds nothing); once the data set is written, the variant's spill folders of
  every setting are removed (the variant cannot be prepared again while it is there)."""
  try:
    prepared = tfds_common.prepare(builder, manual_dir)
  except BaseException:
    spill = builder.spill
    if spill and any(os.path.getsize(os.path.join(spill, f)) for f in os.listdir(spill)):
      logging.warning("%s: the work done so far is kept in %s: the same command again resumes "
                      "from it", builder.name, spill)
    elif spill:
      shutil.rmtree(spill, ignore_errors=True)
    raise
  if builder.spill:
    pattern = f"{builder.name}_spill_{builder.builder_config.name}_*"
    for served in pathlib.Path(builder.spill).parent.glob(pattern):
      shutil.rmtree(served, ignore_errors=True)
  return prepared
