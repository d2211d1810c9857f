"""Per-frame features of the frozen extractors, computed once per recording and cached.

For each 40 ms label frame t of a recording: the face feature of frame t (the student's 128-d
head output) and the audio embedding of the 0.96 s log-mel window centred on the frame's
middle. The arrays of a split go to one .npz next to a JSON key (extractor fingerprints and
the data config); a later run with the same key reads them instead of recomputing.
"""
import hashlib
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np

from avemo_jax.data import audio_features
from avemo_jax.data.sequences import FPS


def fingerprint(variables: Any) -> str:
  """A short hash of a variable tree's values, to tell extractors apart in cache keys."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def batched(fn: Callable, x: np.ndarray, batch: int) -> np.ndarray:
  """fn over x in fixed-size batches (the last one padded), so fn compiles once."""
  out = []
  for start in range(0, len(x), batch):
    chunk = x[start:start + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk))[:batch - pad])
  return np.concatenate(out)


def extract(recordings, *, face_fn: Callable, audio_fn: Callable, batch: int,
            num_threads: int = 2) -> dict[str, np.ndarray]:
  """{"visual" [R, T, Dv], "audio" [R, T, Da], "labels" [R, T, 2], "lengths" [R]}.

  `recordings[r]` has `.labels` [T, 2] and `.audio` (16 kHz); `recordings.frame(r, t)` is the
  uint8 face of frame t. `face_fn(images [B, H, W, 3])` and `audio_fn(mel [B, 96, 64])` return
  [B, D] features. Faces are rendered by Grain threads while the network runs.
  """
  out: dict[str, list[np.ndarray]] = {"visual": [], "audio": [], "labels": []}
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
  for r in range(len(recordings)):
    rec = recordings[r]
    num_frames = len(rec.labels)
    frames = (grain.MapDataset.range(num_frames).map(lambda t, r=r: recordings.frame(r, t))
              .batch(batch).to_iter_dataset(options))
    out["visual"].append(np.concatenate([batched(face_fn, b, batch) for b in frames]))
    log_mel = audio_features.log_mel_spectrogram(rec.audio)
    mel_Tx96x64 = audio_features.examples_at(log_mel, (np.arange(num_frames) + 0.5) / FPS)
    out["audio"].append(batched(audio_fn, mel_Tx96x64, batch))
    out["labels"].append(rec.labels)
  lengths = np.array([len(x) for x in out["labels"]], np.int32)
  pad = lambda xs: np.stack([np.pad(x, [(0, lengths.max() - len(x)), (0, 0)]) for x in xs])
  return {**{k: pad(v).astype(np.float32) for k, v in out.items()}, "lengths": lengths}


def statistics(split: dict[str, np.ndarray], modalities: tuple[str, ...]
               ) -> dict[str, dict[str, np.ndarray]]:
  """{modality: {"mean", "std"}} per dimension over the valid (unpadded) frames of `split`."""
  valid = np.arange(split["labels"].shape[1])[None, :] < split["lengths"][:, None]
  return {m: {"mean": split[m][valid].mean(0), "std": split[m][valid].std(0) + 1e-6}
          for m in modalities}


def standardize(splits: dict[str, dict[str, np.ndarray]], modalities: tuple[str, ...],
                reference: str = "train") -> dict[str, dict[str, np.ndarray]]:
  """Per-dimension zero mean / unit variance of each modality, with the statistics of the valid
  frames of `reference`; padded frames stay zero. Returns new dicts (inputs untouched)."""
  stats = statistics(splits[reference], modalities)
  out = {name: dict(split) for name, split in splits.items()}
  for m in modalities:
    mean, std = stats[m]["mean"], stats[m]["std"]
    for name, split in splits.items():
      mask = np.arange(split[m].shape[1])[None, :, None] < split["lengths"][:, None, None]
      out[name][m] = np.where(mask, (split[m] - mean) / std, 0.0).astype(np.float32)
  return out


def cached(path: pathlib.Path, key: dict[str, Any], compute: Callable[[], dict[str, np.ndarray]]
           ) -> dict[str, np.ndarray]:
  """`compute()`'s arrays, stored at `path` (.npz) under `key`; recomputed when the key differs."""
  key_text = json.dumps(key, sort_keys=True)
  if path.exists():
    with np.load(path) as stored:
      if str(stored["key"]) == key_text:
        logging.info("features: reusing %s", path)
        return {k: stored[k] for k in stored.files if k != "key"}
    logging.info("features: %s was computed by other extractors or data; recomputing", path)
  start = time.perf_counter()
  arrays = compute()
  if jax.process_index() == 0:  # every process computes them; one writes (a shared workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")  # never leave a half-written cache behind
    np.savez(tmp, key=np.array(key_text), **arrays)
    tmp.replace(path)
  logging.info("features: %s (%d recordings) in %.0f s", path, len(arrays["lengths"]),
               time.perf_counter() - start)
  return arrays
