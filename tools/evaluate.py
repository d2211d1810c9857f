"""Evaluates exported models (tools/export.py) on held-out data: the metrics of README's *Metrics*.

  python tools/evaluate.py --export=EXPORT_DIR [--out=DIR] [--data=tfds --data_dir=DATA_DIR]

The data settings come from the exported config.json (the training run's data); --data and
--data_dir switch to the embedded synthetic data or to data sets prepared by tools/prepare_*.py;
--features_from=WORKDIR evaluates fusion models on that run's cached dev features.
Writes DIR/evaluation.json (summary.json's layout), confusion_<model>.png and, for fusion,
dev_NN.png (default DIR: EXPORT_DIR/evaluation).
"""
import json
import pathlib

from absl import app, flags

from avemo_jax import cli, compile_cache, export_eval, xla_cpu

__doc__ += "\n" + export_eval.__doc__

_EXPORT = flags.DEFINE_string("export", None, "tools/export.py's --out, or one model directory "
                              "in it.", required=True)
_OUT = flags.DEFINE_string("out", None, "Where the results go (default: EXPORT/evaluation).")
_DATA = flags.DEFINE_enum("data", None, ["synthetic", "tfds"], "Data source (default: the "
                          "exported config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "--data=tfds: the --data_dir of "
                                "tools/prepare_*.py.")
_FEATURES = flags.DEFINE_string("features_from", None, "Fusion models: a training workdir whose "
                                "cached dev features to use instead of the exported extractors'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DATA.value == "tfds" and not _DATA_DIR.value:
    raise app.UsageError("--data=tfds needs --data_dir=DIR (tools/prepare_*.py's --data_dir)")
  xla_cpu.prepare()  # as avemo_jax.main
  compile_cache.use()  # the main job's cache: the next run loads the models compiled
  out = _OUT.value or str(pathlib.Path(_EXPORT.value) / "evaluation")
  result = export_eval.evaluate(_EXPORT.value, out, data=_DATA.value, data_dir=_DATA_DIR.value,
                                features_from=_FEATURES.value)
  rows = {**{n: result[n] for n in ("teacher", "student", "audio") if n in result},
          **{f"fusion/{n}": e for n, e in result.get("fusion", {}).items()}}
  for name, entry in rows.items():
    print(f"{name:14s}", json.dumps({k: round(v, 4) for k, v in entry.items()
                                     if isinstance(v, float)}))
  print(f"written to {out}/evaluation.json")


if __name__ == "__main__":
  cli.run(main)
