"""The one Grain pipeline builder: random-access sources -> per-epoch shuffle -> augment -> batch.

Face stages zip three streams (below); the audio stage batches log-mel examples of voice clips;
the fusion stage batches random windows of recordings' cached per-frame features.

A training step draws, together (README, *Teacher*), a batch of labelled faces, a batch of FEC
triplets and (distillation) a batch of unlabelled faces. Every stream is a `grain.MapDataset`,
so batch i is a pure function of (seed, i): the iterator state is one index, checkpointed with
the model, and a resumed run sees exactly the batches an uninterrupted run would.

Batch sizes in the config are global. Each process reads every process_count-th example of a
stream (`parallel.shard_stream`, after augmentation, which is seeded per example) and batches
its share: together the processes hold exactly the single-process global batch.
"""
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from avemo_jax import parallel
from avemo_jax.data import (affectnet, audio_features, fec, recola, sequences, synthetic,
                            unlabelled)


@dataclasses.dataclass(frozen=True)
class Sources:
  """Random-access sources (`__len__`, `__getitem__` -> dict of numpy arrays)."""
  train_faces: object
  train_triplets: object
  unlabelled: object
  test_faces: object
  test_triplets: object


def _check_source(data: ml_collections.ConfigDict) -> None:
  if data.source not in ("synthetic", "tfds"):
    raise ValueError(f"config.data.source={data.source!r}: choose 'synthetic' or 'tfds'")
  if data.source == "tfds" and not data.data_dir:
    raise ValueError("config.data.source='tfds' needs --config.data.data_dir=DIR, the --data_dir "
                     "given to tools/prepare_*.py")


def make_sources(data: ml_collections.ConfigDict, seed: int) -> Sources:
  """Face sources: the embedded synthetic ones, or AffectNet + FEC (+ unlabelled faces) prepared
  under data.data_dir (AffectNet's validation set and FEC's test set are the test sources)."""
  _check_source(data)
  size = data.image_size
  if data.source == "tfds":
    crop = dict(image_size=size, margin=data.crop_margin)
    faces = lambda split: affectnet.source(data.data_dir, split,
                                           num_classes=data.affectnet_classes, **crop)
    if data.unlabelled not in ("folder", "affectnet"):
      raise ValueError(f"config.data.unlabelled={data.unlabelled!r}: 'folder' or 'affectnet'")
    return Sources(
        train_faces=faces("train"), train_triplets=fec.source(data.data_dir, "train", **crop),
        unlabelled=(unlabelled.source(data.data_dir, **crop) if data.unlabelled == "folder"
                    else faces("train")),
        test_faces=faces("test"), test_triplets=fec.source(data.data_dir, "test", **crop))
  return Sources(
      train_faces=synthetic.SyntheticFaces(
          data.num_train_faces, seed=seed, split="train", size=size, label_noise=data.label_noise),
      train_triplets=synthetic.SyntheticTriplets(
          data.num_train_triplets, seed=seed, split="train", size=size,
          annotator_noise=data.annotator_noise),
      unlabelled=synthetic.SyntheticUnlabelled(data.num_unlabelled, seed=seed, size=size),
      test_faces=synthetic.SyntheticFaces(data.num_test_faces, seed=seed, split="test", size=size),
      test_triplets=synthetic.SyntheticTriplets(
          data.num_test_triplets, seed=seed, split="test", size=size,
          annotator_noise=data.annotator_noise))


def augment(image_HxWx3: np.ndarray, rng: np.random.Generator, *, pad: int, flip: bool,
            jitter: float) -> np.ndarray:
  """Random crop (edge-padded), horizontal flip and brightness/contrast/saturation jitter."""
  h, w, _ = image_HxWx3.shape
  x = image_HxWx3
  if pad:
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    x = x[top:top + h, left:left + w]
  if flip and rng.random() < 0.5:
    x = x[:, ::-1]
  if jitter:
    brightness, contrast, saturation = 1 + rng.uniform(-jitter, jitter, size=3)
    x = x.astype(np.float32) * brightness
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + saturation * (x - grey)
    x = x.mean() + contrast * (x - x.mean())
    x = np.clip(x, 0, 255) + 0.5  # round, not truncate, in the cast
  return np.ascontiguousarray(x, dtype=np.uint8)


def _batched(ds: grain.MapDataset, global_batch: int, what: str) -> grain.MapDataset:
  """This process's share of every global batch of an (augmented) example stream."""
  batch = parallel.process_batch(global_batch, what)
  return parallel.shard_stream(ds).batch(batch, drop_remainder=True)


# Grain's index_shuffle costs ~16 ms / n per element of an n-element epoch (grain 0.2.18: 1.8 ms at
# n = 9, 19 us at 1000), so a smaller dataset is shuffled as copies of itself, together.
_SHUFFLE_MIN = 1000


def _forever(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
  """`ds` shuffled and repeated forever: every epoch (of at least _SHUFFLE_MIN elements: each
  element the same number of times) in its own order."""
  copies = -(-_SHUFFLE_MIN // len(ds))
  return (ds.repeat(copies) if copies > 1 else ds).seed(seed).shuffle().repeat(None)


def _stream(source, *, seed: int, batch: int, what: str, aug) -> grain.MapDataset:
  """Infinite, reshuffled every epoch, augmented per example, batched."""
  ds = _forever(grain.MapDataset.source(source), seed)
  return _batched(ds.random_map(aug), batch, what)


def train_iterator(config: ml_collections.ConfigDict, name: str, sources: Sources, *,
                   seed: int) -> grain.DatasetIterator:
  """Checkpointable iterator of {"faces", "triplets"[, "unlabelled"]} batches for the face
  stage `name` ("teacher" or "student": its config section gives the batch sizes)."""
  d, stage = config.data, config[name]
  aug = lambda im, rng: augment(im, rng, pad=d.crop_pad, flip=d.flip, jitter=d.colour_jitter)
  face_aug = lambda ex, rng: {**ex, "image": aug(ex["image"], rng)}
  triplet_aug = lambda ex, rng: {**ex, "images": np.stack([aug(im, rng) for im in ex["images"]])}
  streams = {
      "faces": _stream(sources.train_faces, seed=seed, batch=stage.batch_faces,
                       what=f"{name}.batch_faces", aug=face_aug),
      "triplets": _stream(sources.train_triplets, seed=seed + 1, batch=stage.batch_triplets,
                          what=f"{name}.batch_triplets", aug=triplet_aug),
  }
  if stage.batch_unlabelled:
    streams["unlabelled"] = _stream(sources.unlabelled, seed=seed + 2,
                                    batch=stage.batch_unlabelled,
                                    what=f"{name}.batch_unlabelled", aug=face_aug)
  names = tuple(streams)
  length = min(len(s) for s in streams.values())  # all "infinite": equalise for the zip
  zipped = grain.experimental.ZipMapDataset([streams[n][:length] for n in names])
  return _iterator(zipped.map(lambda parts: dict(zip(names, parts))), d)


def _iterator(ds: grain.MapDataset, data: ml_collections.ConfigDict,
              workers: int | None = None) -> "Positioned":
  """Batches read by `data.num_threads` threads, in `workers` (default `data.workers`) processes
  (each a slice of the batch indices, merged back in order: the same batches as with none)."""
  options = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
  workers = grain.MultiprocessingOptions(
      num_workers=data.workers if workers is None else workers,
      per_worker_buffer_size=data.prefetch)
  return Positioned(ds, lambda ds: iter(ds.to_iter_dataset(options).mp_prefetch(workers)))


class Positioned:
  """The batches of `ds` as `read(ds)` reads them, whose checkpointed state is the number handed
  out: batch i depends on i alone, so a run resumes at the same batch whatever reads them
  (Grain's own state has one form per worker count). By hand: Grain has no such state."""

  def __init__(self, ds: grain.MapDataset, read: Callable[[grain.MapDataset], Iterator]):
    self._ds, self._read, self._next = ds, read, 0
    self._batches = read(ds)

  def __iter__(self) -> "Positioned":
    return self

  def __next__(self) -> Any:
    batch = next(self._batches)
    self._next += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_batch": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    """Also Grain's states of avemo_jax before 2026-12-03 (one reader, or worker processes)."""
    if "next_batch" in state:
      position = state["next_batch"]
    elif "next_index" in state:
      position = state["next_index"]
    else:
      position = sum(s["next_index"] for s in state["iterators_in_use_states"])
    self.close()
    self._next, self._batches = position, self._read(self._ds[position:])

  def close(self) -> None:
    if hasattr(self._batches, "close"):
      self._batches.close()


def clip_iterator(clips, *, seed: int, batch: int, data: ml_collections.ConfigDict
                  ) -> grain.DatasetIterator:
  """Audio stage: {"mel" Bx96x64, "labels" Bx2} from a source of {"audio", "labels"} clips."""
  to_example = lambda ex: {"mel": audio_features.waveform_to_examples(
      ex["audio"], audio_features.SAMPLE_RATE)[0], "labels": ex["labels"]}
  ds = _forever(grain.MapDataset.source(clips), seed).map(to_example)
  return _iterator(_batched(ds, batch, "audio.train.batch"), data)


def chunk_iterator(lengths: np.ndarray, *, seed: int, batch: int, frames: int,
                   data: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Fusion stage: {"recording", "start"} [B] of random `frames`-long windows of recordings of
  `lengths` frames (from 0 when shorter); the step cuts them from the recordings' features, held
  on the device (`steps.windows`): ~1 kB a batch instead of the windows' features."""
  def window(r: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    start = rng.integers(0, max(int(lengths[r]) - frames, 0) + 1)
    return {"recording": np.int32(r), "start": np.int32(start)}

  ds = _forever(grain.MapDataset.range(len(lengths)), seed)
  # In this process: worker processes' round trips cost more than such batches take to make.
  return _iterator(_batched(ds.random_map(window), batch, "fusion.train.batch"), data, workers=0)


def recordings(config: ml_collections.ConfigDict, split: str):
  """Audio-visual recordings of split "train" or "dev": synthetic, or prepared RECOLA."""
  data, seq = config.data, config.sequences
  _check_source(data)
  if data.source == "tfds":
    return recola.source(data.data_dir, split, image_size=data.image_size, margin=data.crop_margin)
  num, seconds = (seq.num_train, seq.train_seconds) if split == "train" else (seq.num_dev,
                                                                               seq.dev_seconds)
  return sequences.SyntheticRecordings(num, seed=config.seed, split=split, seconds=seconds,
                                       size=data.image_size)


def clips(config: ml_collections.ConfigDict, split: str):
  """Audio-stage clips {"audio", "labels"} of split "train" or "dev": synthetic voice clips, or
  0.96 s windows of prepared RECOLA recordings around every data.clip_stride-th label frame
  (every 5x that on dev)."""
  data, seq = config.data, config.sequences
  _check_source(data)
  if data.source == "tfds":
    stride = data.clip_stride * (1 if split == "train" else 5)
    return recola.clips(data.data_dir, split, stride=stride, image_size=data.image_size,
                        margin=data.crop_margin)
  if split == "train":
    return sequences.SyntheticClips(seq.num_train_clips, seed=config.seed)
  return sequences.SyntheticClips(seq.num_dev_clips, seed=config.seed + 1)


def _padded(out: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
  """A short last batch filled up to `batch` with copies of its last item, labelled -1."""
  missing = batch - len(next(iter(out.values())))
  if missing:
    out = {k: np.concatenate([v, np.repeat(v[-1:], missing, axis=0)]) for k, v in out.items()}
    for k in ("label", "triplet_type"):
      if k in out:
        out[k][-missing:] = -1
  return out


def eval_batches(source, batch: int, keys: tuple[str, ...], num_threads: int = 2
                 ) -> grain.IterDataset:
  """The whole source in order, in fixed-size batches (the last padded, with label -1), read
  by Grain threads each time it is iterated: a test set is never held in memory whole (FEC's
  test triplets at 140 px: ~1.9 GB per 10,000)."""
  fields = lambda item: {k: item[k] for k in keys}
  return (grain.MapDataset.range(len(source)).map(lambda i: fields(source[i])).batch(batch)
          .map(lambda out: _padded(out, batch))
          .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))
