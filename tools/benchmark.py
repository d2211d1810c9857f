"""Times the full-size models' train and inference steps, start-up, input pipelines and predict,
side by side with the same networks in PyTorch when torch is installed (pip install -e .[bench]).

  python tools/benchmark.py --out=bench.json --markdown=bench.md
  python tools/benchmark.py --only=face_train,fusion_train --reps=3 --warmup=1
  python tools/benchmark.py --quick   # the :tiny models, small batches: checks the tool itself

Rows (JSON keys): face_train, face_infer (images/s), audio_train (examples/s), fusion_train,
fusion_infer (sequences/s), first_step_cold_s, first_step_warm_s (seconds from process start to
the first finished face train step, with an empty / a filled persistent compilation cache),
pipeline_synthetic_per_core, pipeline_arrayrecord_per_core (images/s per Grain read thread),
predict_fps (video frames/s). Each throughput row holds "jax" (median, min, max, iqr, reps, unit,
compile_s, gflop_per_call, on GPU/TPU mfu), "torch" and "ratio" (JAX / PyTorch) when the peer ran.
"""
import importlib.util
import json
import pathlib
import sys

from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `configs` importable

from avemo_jax import benchmark, xla_cpu  # noqa: E402
from configs import distill  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the Markdown table to this file too.")
_ONLY = flags.DEFINE_list("only", list(benchmark.ROWS), "Rows to measure.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions per row.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed repetitions before them (torch's oneDNN "
                               "kernels take two or three calls to reach speed).")
_FACE_BATCH = flags.DEFINE_integer("face_batch", 32, "Face images per step.")
_AUDIO_BATCH = flags.DEFINE_integer("audio_batch", 32, "Log-mel examples per step.")
_FUSION_BATCH = flags.DEFINE_integer("fusion_batch", 8, "Sequences per fusion step.")
_FRAMES = flags.DEFINE_integer("frames", 750, "Frames per fusion sequence (25 a second).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Computation dtype of the face and audio networks (config.dtype; "
                           "auto: bfloat16 on GPU/TPU, float32 on CPU).")
_GRU_KERNEL = flags.DEFINE_enum("gru_kernel", "scan", ["scan", "pallas"], "The fusion GRUs' "
                                "recurrence (config.fusion.gru_kernel; 'pallas': NVIDIA GPUs).")
_PEER = flags.DEFINE_enum("peer", "auto", ["auto", "on", "off"], "Time the PyTorch peer: 'auto' "
                          "when torch is installed, 'on' (it must be), 'off'.")
_PREDICT_EXPORT = flags.DEFINE_string("predict_export", "", "predict_fps: an export directory "
                                      "(tools/export.py --out) of a trained workdir.")
_PREDICT_VIDEO = flags.DEFINE_string("predict_video", "", "predict_fps: a video with a face.")
_PROFILE = flags.DEFINE_string("profile", "", "A jax.profiler trace of 2 more JAX reps of each "
                               "model row into this folder, PROFILE/<row>.")
_QUICK = flags.DEFINE_bool("quick", False, "The :tiny configs, tiny batches, 1 warm-up and 2 "
                           "timed reps: a check of the tool, not a measurement.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  xla_cpu.prepare()  # as avemo_jax.main does: training speed, not malloc's
  quick = _QUICK.value
  has_torch = importlib.util.find_spec("torch") is not None
  if _PEER.value == "on" and not has_torch:
    raise app.UsageError("--peer=on needs torch: pip install -e .[bench]")
  config = distill.get_config("tiny" if quick else None)
  with config.unlocked():
    config.dtype = _DTYPE.value
    config.fusion.gru_kernel = _GRU_KERNEL.value
  settings = benchmark.Settings(
      reps=2 if quick else _REPS.value, warmup=1 if quick else _WARMUP.value,
      face_batch=8 if quick else _FACE_BATCH.value, audio_batch=4 if quick else _AUDIO_BATCH.value,
      fusion_batch=2 if quick else _FUSION_BATCH.value, frames=50 if quick else _FRAMES.value,
      pipeline_batches=2 if quick else benchmark.Settings.pipeline_batches,
      predict_export=_PREDICT_EXPORT.value, predict_video=_PREDICT_VIDEO.value,
      profile=_PROFILE.value,
      peer=_PEER.value == "on" or (_PEER.value == "auto" and has_torch))
  logging.info("benchmark: %s", settings)
  results = benchmark.run(config, settings, tuple(_ONLY.value))
  table = f"Machine: {benchmark.machine()}\n\n{benchmark.markdown(results)}"
  print(table)
  if _MARKDOWN.value:
    pathlib.Path(_MARKDOWN.value).write_text(table)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
