"""Exports the trained models of a workdir, one self-contained directory each.

  python tools/export.py --workdir=WORKDIR --out=EXPORT_DIR [--onnx=auto]

Each model's architecture comes from WORKDIR/<stage>/config.json, the config of the run that
trained it (or give --config=configs/... with the run's --config.* overrides). Writes
EXPORT_DIR/{teacher,student,audio,fusion/<model>} for what the workdir holds and for what its run
read from another workdir instead of training it (--config.student_checkpoint, audio_checkpoint,
teacher_checkpoint), from there; load one with `avemo_jax.export.load(DIR)` or, without this
package, the `load.py` in it.
"""
import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from avemo_jax import cli, export
from avemo_jax.train import checkpoint

# The configs import each other as `configs.<name>`: the repository root must be importable, as
# it is for `python -m avemo_jax.main` run from there.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

__doc__ += "\n" + export.__doc__

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config the workdir was trained with (default: each stage's "
    "WORKDIR/<stage>/config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "The training run's --workdir.")
_OUT = flags.DEFINE_string("out", None, "Where the exported model directories go.", required=True)
_ONNX = flags.DEFINE_enum("onnx", "auto", ["auto", "on", "off"], "ONNX models too: 'auto' where "
                          "jax2onnx and onnxruntime are installed, 'on' (they must be), 'off'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  written = export.export_workdir(_CONFIG.value, _WORKDIR.value, _OUT.value, onnx=_ONNX.value)
  for name, directory in written.items():
    manifest = json.loads((directory / "manifest.json").read_text())
    source = manifest["source"]
    reused = f"  from {source['workdir']}/{source['stage']}" if "read_by" in source else ""
    print(f"{name:14s} {directory}{reused}  ONNX: {manifest['onnx']['status']}")


if __name__ == "__main__":
  cli.run(main)
