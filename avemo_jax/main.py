"""Entry point: python -m avemo_jax.main --config=configs/distill.py[:tiny] [--workdir=DIR]."""
import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from avemo_jax import cli, parallel, xla_cpu
from avemo_jax.train import checkpoint, stages
from avemo_jax.train import workdir as workdir_lib


def _configs_importable() -> None:
  """configs/*.py import `configs.common`: the folder holding the given file's configs/ goes on
  the path, so that a config loads from any working directory."""
  for spec in cli.config_files(sys.argv[1:]):
    sys.path.insert(0, str(pathlib.Path(spec.split(":")[0]).resolve().parent.parent))


_configs_importable()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/distill.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  xla_cpu.prepare()  # before XLA's threads start: no re-faulted buffers, its fastest convolutions
  parallel.initialize(_CONFIG.value.parallel)  # before anything touches a device
  if not parallel.is_main_process():
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  stages.validate(config)  # a config mistake leaves no trace: no workdir, no lock, no config dump
  workdir_lib.absolute_paths(config)
  logging.info("config:\n%s", config)
  with workdir_lib.exclusive(workdir):
    summary = workdir_lib.finished(config, workdir)
    if summary is None:
      workdir_lib.clear_finished(workdir)
      summary = stages.run(config, workdir)
      workdir_lib.mark_finished(config, workdir, summary)
    else:
      logging.info("%s: this config already finished here; nothing to do", workdir)
  if parallel.is_main_process():
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  cli.run(main)
