"""Prediction on media with exported models (tools/export.py's --out, "EXPORT" below).

Video -> per-frame (25 Hz) valence and arousal, computed as the fusion stage computed its training
features (`train/features.py`) on RECOLA as tools/prepare_recola.py prepares it:
  1. label frames at 25 Hz from any source rate (`media.video_frames`);
  2. the face tracked and cropped in each (`faces.track`, crop side and margin from the face
     export's manifest; the first detected box before the first detection, the last one over
     frames without a detection);
  3. visual: EXPORT/student's `feature` of each crop; audio: the video's own sound track at 16 kHz
     mono (`media.load_audio`), lined up with the pictures by the streams' start times (a late
     start is preceded by silence, an early one cut), EXPORT/audio's `embedding` of the 0.96 s
     log-mel window centred on each frame (`audio_features.examples_at(log_mel, (t + 0.5) / 25)`);
  4. EXPORT/fusion/fused over the whole sequence; a video without a readable sound track goes
     through EXPORT/fusion/visual instead, and the result says so.
The extractors must be the ones the fusion model was trained on (checked by fingerprint).

Images -> the face export's expression probabilities (softmax of its logits), its 128-d feature
and its expression embedding, for the best detected face. An image without a detected face is
taken as an already-cropped face (its centred square), with a note; `require_face` refuses it.
An unreadable image gets an error entry, and the others go on.

Network calls go in fixed-size batches (the last padded), and the fusion model's sequence is
padded to whole 10 s (masked): each model compiles once a batch size and 10 s of video length.
"""
import dataclasses
import itertools
import json
import pathlib
import time
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from avemo_jax import exported
from avemo_jax.data import audio_features, faces, media
from avemo_jax.train import features

FPS = 25  # label frames per second, as RECOLA's
BATCH = 32  # frames or images per network call
SEQUENCE_BUCKET = 250  # fusion inputs are padded to a multiple of this many frames (10 s)
_TRAINED_BY = {"face": "configs/distill.py or configs/fusion.py", "audio": "configs/audio.py or "
               "configs/fusion.py", "fusion": "configs/fusion.py"}


def _load(directory: pathlib.Path, kind: str, root: pathlib.Path) -> exported.Model:
  """The `kind` export in `directory`; a missing one names the command that writes it."""
  if not (directory / exported.MANIFEST).is_file():
    raise FileNotFoundError(
        f"{directory}: no exported model there ({exported.MANIFEST} missing). Export a trained "
        f"workdir: python tools/export.py --workdir=WORKDIR --out={root} (after training "
        f"{_TRAINED_BY[kind]}; it also exports the student and audio encoder a fusion run read "
        "from another workdir, which older exports of such a run lack: export it again)")
  return exported.load(directory, kind)


def face_model(export, name: str = "student") -> exported.Model:
  """The face export: `export` itself when it is one model directory, else `export`/<name>."""
  path = pathlib.Path(export)
  return _load(path if (path / exported.MANIFEST).is_file() else path / name, "face", path)


def _check_extractor(fusion: exported.Model, modality: str, extractor: exported.Model) -> None:
  """Refuses an extractor other than the one whose features `fusion` was trained on (another
  run's student would give features the GRU has never seen, and plausible-looking nonsense)."""
  want = fusion.manifest["preprocessing"]["extractor_fingerprints"][modality]
  got = extractor.manifest["source"]["fingerprint"]
  if got != want:
    raise ValueError(f"{fusion.directory} was trained on {modality} features of the extractor "
                     f"{want}, but {extractor.directory} is {got}: give an export directory "
                     "written from one training workdir")


def _batched(model: exported.Model, name: str, x: np.ndarray, outputs: tuple[str, ...],
             batch: int) -> dict[str, np.ndarray]:
  """`model`'s `outputs` on input `name` = x, in batches of `batch`."""
  sizes = [s["shape"][-1] for o in outputs for s in model.manifest["outputs"] if s["name"] == o]

  def call(b):
    result = model(**{name: b})
    return np.concatenate([np.asarray(result[o]) for o in outputs], axis=-1)

  flat = features.batched(call, x, batch)
  return dict(zip(outputs, np.split(flat, np.cumsum(sizes)[:-1], axis=-1)))


@dataclasses.dataclass
class VideoPrediction:
  """Per label frame t (time t / 25 s): predictions and the inputs the fusion model got."""
  times_s: np.ndarray  # [T]
  valence_arousal: np.ndarray  # [T, 2]
  detected: np.ndarray  # [T] bool: False where the face box was carried from another frame
  boxes: np.ndarray  # [T, 4] (x, y, w, h) cropped, in source pixels
  visual: np.ndarray  # [T, Dv] the face export's features
  audio: np.ndarray | None  # [T, Da] the audio export's embeddings; None without sound
  summary: dict[str, Any]  # what predictions.json holds


def _sound(path, info: media.MediaInfo) -> tuple[np.ndarray | None, str | None]:
  """(16 kHz mono waveform from the first video frame on, None), or (None, why the video's sound
  cannot be used). The audio stream starting `info.audio_start_s - info.video_start_s` after the
  pictures (as players line them up) is preceded by that much silence, or cut by it."""
  if not info.has_audio:
    return None, "the video has no audio track"
  try:
    waveform = media.load_audio(path)
  except ValueError as e:
    return None, f"its audio track is unreadable ({e})"
  late = round((info.audio_start_s - info.video_start_s) * audio_features.SAMPLE_RATE)
  waveform = (np.concatenate([np.zeros(late, np.float32), waveform]) if late > 0
              else waveform[-late:])
  if not len(waveform):
    return None, "its audio track ends before the first video frame"
  return waveform, None


def predict_video(export, path, out=None, *, detector: faces.FaceDetector | None = None,
                  detect_every: int = 1, smooth: float = 0.0, batch: int = BATCH
                  ) -> VideoPrediction:
  """Valence and arousal of the face in video `path` at 25 Hz; with `out`, writes
  OUT/predictions.{csv,png,json}. `detector`, `detect_every`, `smooth`: as tools/prepare_recola.py
  (defaults: its defaults)."""
  start, root, path = time.perf_counter(), pathlib.Path(export), pathlib.Path(path)
  if detect_every < 1 or not 0 <= smooth < 1 or batch < 1:
    raise ValueError(f"need detect_every >= 1, 0 <= smooth < 1, batch >= 1; got {detect_every}, "
                     f"{smooth}, {batch}")
  if (root / exported.MANIFEST).is_file():
    raise ValueError(f"{root} is one exported model; a video needs the whole export directory "
                     "(tools/export.py's --out, holding student/, audio/ and fusion/)")
  info = media.probe(path)
  if not info.has_video:
    raise ValueError(f"{path}: no video stream; give a video file (--image for pictures)")
  face = face_model(root)
  waveform, why_not = _sound(path, info)
  fusion = _load(root / "fusion" / ("visual" if waveform is None else "fused"), "fusion", root)
  _check_extractor(fusion, "visual", face)
  audio = None if waveform is None else _load(root / "audio", "audio", root)
  if audio is not None:
    _check_extractor(fusion, "audio", audio)
  detector = detector or faces.FaceDetector()
  times_s, detected, boxes, visual = _visual(face, path, detector, detect_every, smooth, batch)
  embeddings = None if audio is None else _embeddings(audio, waveform, len(times_s), batch)
  va = _fused(fusion, visual, embeddings)
  tracking = dict(detector=detector.__getstate__(), detect_every=detect_every, smooth=smooth)
  summary = _summary(path, info, times_s, detected, face, audio, fusion, why_not, waveform,
                     tracking, time.perf_counter() - start)
  prediction = VideoPrediction(times_s, va, detected, boxes, visual, embeddings, summary)
  if out is not None:
    write_video_outputs(prediction, pathlib.Path(out), str(fusion.manifest["name"]))
  return prediction


def _fused(fusion: exported.Model, visual: np.ndarray, audio: np.ndarray | None) -> np.ndarray:
  """[T, 2]: `fusion` on the whole sequence, padded to a multiple of SEQUENCE_BUCKET frames (the
  padding is masked, and the GRU runs forward: it leaves frames 0..T-1 as they are)."""
  frames = len(visual)
  pad = lambda x: np.pad(x, ((0, -frames % SEQUENCE_BUCKET), (0, 0)))[None]
  inputs = {"visual": pad(visual), "lengths": np.array([frames], np.int32)}
  if audio is not None:
    inputs["audio"] = pad(audio)
  return np.asarray(fusion(**inputs)["valence_arousal"])[0, :frames]


def _visual(face: exported.Model, path, detector, detect_every, smooth, batch):
  """(times [T], detected [T], boxes [T, 4], features [T, Dv]): the face tracked and cropped
  at 25 Hz as RECOLA's preparation does, and the face export's feature of each crop."""
  prep = face.manifest["preprocessing"]
  # A first pass finds the first face, whose box the frames before it take (as recola_worker).
  box = faces.first_box(media.video_frames(path, FPS), detector, detect_every)
  if box is None:
    raise ValueError(f"{path}: no face found in any of its frames at {FPS} Hz; check the video "
                     "(faces must be upright and frontal, at least a tenth of the frame)")
  tracked = faces.track(media.video_frames(path, FPS), detector, margin=prep["crop_margin"],
                        size=prep["crop_size"], name=str(path), smooth=smooth,
                        detect_every=detect_every, box=box)
  times, detected, boxes, feats = [], [], [], []
  for chunk in iter(lambda: list(itertools.islice(tracked, batch)), []):
    times += [f.time_s for f in chunk]
    detected += [f.detected for f in chunk]
    boxes += [f.box for f in chunk]
    crops = np.stack([f.crop for f in chunk])
    feats.append(_batched(face, "images", crops, ("feature",), batch)["feature"])
  return (np.asarray(times), np.asarray(detected), np.asarray(boxes),
          np.concatenate(feats))


def _embeddings(audio: exported.Model, waveform: np.ndarray, num_frames: int, batch: int
                ) -> np.ndarray:
  """[T, Da]: the audio export's embedding of the 0.96 s log-mel window centred on each frame."""
  log_mel = audio_features.log_mel_spectrogram(waveform)
  centres = (np.arange(num_frames) + 0.5) / FPS
  return np.concatenate([
      _batched(audio, "mel", audio_features.examples_at(log_mel, centres[k:k + batch]),
               ("embedding",), batch)["embedding"] for k in range(0, num_frames, batch)])


def _summary(path, info, times_s, detected, face, audio, fusion, why_not, waveform, tracking,
             seconds) -> dict[str, Any]:
  model = lambda m: None if m is None else {"name": m.manifest["name"], "directory": str(
      m.directory.resolve()), "fingerprint": m.manifest["source"]["fingerprint"]}
  note = None
  if why_not:
    note = (f"no audio used: {why_not}; valence and arousal come from the visual-only model "
            f"{fusion.manifest['name']}")
  prep = face.manifest["preprocessing"]
  return {
      "video": str(path), "source": dataclasses.asdict(info), "fps": FPS,
      "frames": len(times_s), "last_frame_s": float(times_s[-1]),
      "frames_without_face": int((~detected).sum()), "note": note,
      "audio": {"used": audio is not None, "why_not": why_not,
                "seconds_from_first_frame": None if waveform is None else round(
                    len(waveform) / audio_features.SAMPLE_RATE, 3),
                "starts_after_video_s": round(info.audio_start_s - info.video_start_s, 4)},
      "models": {"face": model(face), "audio": model(audio), "fusion": model(fusion)},
      "face_tracking": {**tracking, "crop_size": prep["crop_size"],
                        "crop_margin": prep["crop_margin"],
                        "without_face": "the last detected box is carried (before the first "
                                        "detection: the first detected box)"},
      "seconds": round(seconds, 2), "frames_per_s": round(len(times_s) / seconds, 1)}


def write_video_outputs(p: VideoPrediction, out: pathlib.Path, model_name: str) -> None:
  """OUT/predictions.csv (time_s, valence, arousal, face_detected), .png and .json."""
  out.mkdir(parents=True, exist_ok=True)
  rows = [f"{t:.2f},{v:.6f},{a:.6f},{int(d)}"
          for t, (v, a), d in zip(p.times_s, p.valence_arousal, p.detected)]
  (out / "predictions.csv").write_text("time_s,valence,arousal,face_detected\n"
                                       + "\n".join(rows) + "\n")
  edges = np.diff(np.r_[0, ~p.detected, 0].astype(int))  # runs of frames without a face
  misses, half = list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1)), 0.5 / FPS
  fig = Figure(figsize=(10, 5))
  axes = fig.subplots(2, 1, sharex=True)
  for d, (ax, name) in enumerate(zip(axes, ("valence", "arousal"))):
    for k, (first, last) in enumerate(misses):
      ax.axvspan(p.times_s[first] - half, p.times_s[last] + half, color="tab:gray", alpha=0.25,
                 linewidth=0, label=None if k else "no face detected (box carried)")
    ax.plot(p.times_s, p.valence_arousal[:, d], linewidth=1, label=model_name)
    limit = max(1.1, 1.05 * float(np.abs(p.valence_arousal[:, d]).max()))
    ax.set(ylabel=name, ylim=(-limit, limit))
    ax.grid(alpha=0.3)
  axes[0].set_title(pathlib.Path(p.summary["video"]).name + (" (no audio: visual-only model)"
                                                             if p.summary["note"] else ""))
  axes[0].legend(loc="upper right", fontsize=7, ncol=2)
  axes[1].set_xlabel("time (s)")
  fig.tight_layout()
  fig.savefig(out / "predictions.png", dpi=80)
  files = {"csv": str(out / "predictions.csv"), "png": str(out / "predictions.png")}
  (out / "predictions.json").write_text(json.dumps({**p.summary, "files": files}, indent=2) + "\n")


def predict_images(export, paths, out=None, *, face_model_name: str = "student",
                   detector: faces.FaceDetector | None = None, require_face: bool = False,
                   batch: int = BATCH) -> list[dict[str, Any]]:
  """Expression probabilities, feature and embedding of the best face of each image (an
  unreadable one: {"image", "model", "error"}); with `out`, each goes to OUT/<image stem>.json."""
  if batch < 1:
    raise ValueError(f"need batch >= 1, got {batch}")
  paths = [pathlib.Path(p) for p in paths]
  stems = [p.stem for p in paths]
  if len(set(stems)) < len(stems):
    raise ValueError(f"images with the same file stem would write the same json: {stems}")
  model = face_model(export, face_model_name)
  detector = detector or faces.FaceDetector()
  prep, classes = model.manifest["preprocessing"], model.manifest["classes"]
  crops, results, read = [], [], []  # read: the results of readable images
  for path in paths:
    try:
      image = faces.load_image(path)
    except (ValueError, FileNotFoundError) as e:
      results.append({"image": str(path), "model": model.manifest["name"], "error": str(e)})
      continue
    found = detector.detect(image)
    note = None
    if len(found):
      box = found[0, :4]
    elif require_face:
      raise ValueError(f"{path}: no face found (faces must be upright and frontal, at least a "
                       "tenth of the image's shorter side)")
    else:  # the centred square of the image, side = its shorter side, as a crop with the margin
      side = min(image.shape[:2]) / (1 + 2 * prep["crop_margin"])
      box = np.array([(image.shape[1] - side) / 2, (image.shape[0] - side) / 2, side, side])
      note = ("no face detected: the image's centred square was used as the face crop (right "
              "for an already-cropped face; meaningless if the image shows no face)")
    crops.append(faces.crop(image, box, margin=prep["crop_margin"], size=prep["crop_size"]))
    read.append({"image": str(path), "model": model.manifest["name"],
                 "model_directory": str(model.directory.resolve()),
                 "face_detected": bool(len(found)), "box": [float(v) for v in box],
                 "note": note})
    results.append(read[-1])
  if not crops:
    raise ValueError("no readable image: " + "; ".join(r["error"] for r in results))
  outputs = _batched(model, "images", np.stack(crops), ("logits", "feature", "embedding"),
                     min(batch, len(crops)))
  logits = outputs["logits"].astype(np.float64)
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  for i, result in enumerate(read):
    result.update(
        probabilities=dict(zip(classes, probabilities[i].tolist())),
        top=classes[int(np.argmax(probabilities[i]))], logits=logits[i].tolist(),
        feature=outputs["feature"][i].tolist(), embedding=outputs["embedding"][i].tolist())
  for path, result in zip(paths, results) if out is not None else ():
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / f"{path.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  return results


def image_report(results: list[dict[str, Any]], top: int = 3) -> str:
  """What tools/predict.py prints for `predict_images`'s results: a line per image (name, whether
  a face was found, its `top` most likely expressions, or ERROR), then the notes and errors."""
  lines = [f"{'image':30s} {'face':5s} top expressions ({results[0]['model']})"]
  for r in results:
    image = f"{pathlib.Path(r['image']).name[:30]:30s} "
    if "error" in r:
      lines.append(image + "-     ERROR: unreadable, left out")
      continue
    best = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:top]
    lines.append(image + f"{'yes' if r['face_detected'] else 'NO':5s} "
                 + "  ".join(f"{name} {p:.3f}" for name, p in best))
  lines += [f"NOTE: {r['image']}: {r['note']}" for r in results if r.get("note")]
  lines += [f"ERROR: {r['error']}" for r in results if "error" in r]
  return "\n".join(lines)
