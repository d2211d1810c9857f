"""Predicts with exported models (tools/export.py) on a video or on face images.

  python tools/predict.py --export=EXPORT_DIR --video=FILE.mp4 --out=OUT_DIR
      [--detect_every=1] [--smooth=0] [--min_face=0.1] [--max_side=480] [--rolls=15,-15] ...
  python tools/predict.py --export=EXPORT_DIR --image=A.jpg [--image=B.png ...] [--out=OUT_DIR]
      [--face_model=student|teacher] [--require_face]

Video: writes OUT_DIR/predictions.csv (time_s, valence, arousal, face_detected; one row per
40 ms frame from 0 s to the video's end), predictions.png (both over time, frames without a
detected face shaded) and predictions.json (models, frames, frames without a face, whether the
sound track was used, the video's probe). Use the face detector settings RECOLA was prepared with
(tools/prepare_recola.py's flags, same defaults). A video without sound is predicted by the
visual-only fusion model, with a note. Images: prints each image's most likely expressions and
writes OUT_DIR/<image stem>.json (probabilities, logits, 128-d feature, embedding, face box).
"""
import pathlib

from absl import app, flags

import detector_flags

from avemo_jax import cli, compile_cache, predict, xla_cpu
from avemo_jax.data import faces

__doc__ += "\n" + predict.__doc__

_EXPORT = flags.DEFINE_string("export", None, "tools/export.py's --out (for --image also one face "
                              "model directory in it).", required=True)
_VIDEO = flags.DEFINE_string("video", None, "A video file (anything FFmpeg reads).")
_IMAGES = flags.DEFINE_multi_string("image", None, "An image file; repeat for more.")
_OUT = flags.DEFINE_string("out", None, "Where the results go (required for --video).")
_FACE_MODEL = flags.DEFINE_enum("face_model", "student", ["student", "teacher"], "--image: the "
                                "face export to use (a video always uses the fusion model's).")
_REQUIRE_FACE = flags.DEFINE_bool("require_face", False, "--image: refuse an image without a "
                                  "detected face instead of using its centred square.")
_DETECT_EVERY = flags.DEFINE_integer("detect_every", 1, "--video: detect on every n-th frame, "
                                     "carrying the box in between (faster).")
_SMOOTH = flags.DEFINE_float("smooth", 0.0, "--video: box smoothing, 0 <= a < 1 (box = a * "
                             "previous + (1 - a) * detection).")
_BATCH = flags.DEFINE_integer("batch", predict.BATCH, "Frames or images per network call.")
flags.adopt_module_key_flags(detector_flags)  # in --help


def _video(detector: faces.FaceDetector) -> None:
  if not _OUT.value:
    raise app.UsageError("--video needs --out=DIR for predictions.csv, .png and .json")
  p = predict.predict_video(_EXPORT.value, _VIDEO.value, _OUT.value, detector=detector,
                            detect_every=_DETECT_EVERY.value, smooth=_SMOOTH.value,
                            batch=_BATCH.value)
  s = p.summary
  if s["note"]:
    print(f"NOTE: {s['note']}")
  print(f"{s['frames']} frames at {s['fps']} Hz (0 - {s['last_frame_s']:.2f} s), "
        f"{s['frames_without_face']} without a detected face; models: "
        + ", ".join(m["name"] for m in s["models"].values() if m))
  print(f"mean valence {p.valence_arousal[:, 0].mean():+.3f}, arousal "
        f"{p.valence_arousal[:, 1].mean():+.3f}; {s['frames_per_s']} frames/s")
  print(f"written to {pathlib.Path(_OUT.value) / 'predictions.csv'}, .png, .json")


def _images(detector: faces.FaceDetector) -> None:
  results = predict.predict_images(_EXPORT.value, _IMAGES.value, _OUT.value,
                                   face_model_name=_FACE_MODEL.value, detector=detector,
                                   require_face=_REQUIRE_FACE.value, batch=_BATCH.value)
  print(predict.image_report(results))
  if _OUT.value:
    print(f"written to {_OUT.value}/<image stem>.json")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_cpu.prepare()  # as avemo_jax.main
  compile_cache.use()  # the main job's cache: the next run loads the models compiled
  if bool(_VIDEO.value) == bool(_IMAGES.value):
    raise app.UsageError("give either --video=FILE or --image=FILE (repeatable)")
  detector = faces.FaceDetector(**detector_flags.options())
  if _VIDEO.value:
    _video(detector)
  else:
    _images(detector)


if __name__ == "__main__":
  cli.run(main)
