"""The command line: `python -m avemo_jax.main --config=... --workdir=...` with overrides."""
import gzip
import json
import logging
import os
import subprocess
import sys

import pytest

from avemo_jax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "avemo_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_cli_runs_teacher_with_overrides(tmp_path):
  """Also: a path flag's leading "~" is the home folder (bash leaves `--workdir=~/x` as it is)."""
  result = _main("--config=configs/teacher.py:tiny", "--workdir=~/",
                 "--config.teacher.num_steps=4", "--config.teacher.log_every=2",
                 "--config.teacher.profile_first=2", "--config.teacher.profile_steps=2",
                 HOME=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  # A jax.profiler trace of steps 2-3, for TensorBoard's profile plugin and Perfetto.
  assert "profile of steps 2-3 written to" in result.stderr
  traces = list((tmp_path / "teacher" / "profile").glob("plugins/profile/*/*.trace.json.gz"))
  assert len(traces) == 1 and len(list(traces[0].parent.glob("*.xplane.pb"))) == 1
  assert b"teacher_step" in gzip.decompress(traces[0].read_bytes())
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary) == {"teacher"}
  steps = [json.loads(l)["step"] for l in (tmp_path / "teacher" / "metrics.jsonl").open()]
  assert steps == [2, 4, 4]  # two training lines, then the final evaluation
  assert "[teacher] step 4/4" in result.stderr  # the progress line
  assert "checkpoint_manager.py" not in result.stderr  # Orbax's INFO lines (test below)
  assert json.loads(result.stdout) == summary  # the summary, printed at the end
  # The same command again: a no-op that prints the summary; another config trains again.
  again = _main("--config=configs/teacher.py:tiny", f"--workdir={tmp_path}",
                "--config.teacher.num_steps=4", "--config.teacher.log_every=2",
                "--config.teacher.profile_first=2", "--config.teacher.profile_steps=2")
  assert again.returncode == 0 and json.loads(again.stdout) == summary
  assert "already finished here" in again.stderr and "[teacher] step" not in again.stderr


def test_orbax_logs_only_its_warnings():
  """Orbax logs a dozen INFO lines for every checkpoint written or read (absl's logger, which
  the main job and tools/export.py filter); its warnings and everyone else's INFO stay."""
  from absl import logging as absl_logging
  import orbax.checkpoint as ocp
  orbax_file = ocp.checkpoint_manager.__file__
  record = lambda path, level: logging.LogRecord("absl", level, path, 1, "message", None, None)
  logger = absl_logging.get_absl_logger()
  before = list(logger.filters)
  checkpoint.quiet_orbax_logs()
  try:
    assert not logger.filter(record(orbax_file, logging.INFO))
    assert logger.filter(record(orbax_file, logging.WARNING))
    assert logger.filter(record(orbax_file, logging.ERROR))
    assert logger.filter(record(checkpoint.__file__, logging.INFO))
  finally:
    logger.filters[:] = before


_CONFIGS = "the configs in configs/: audio.py, distill.py, fusion.py, teacher.py (each also :tiny)"


@pytest.mark.parametrize("override,message", [
    ("--config.teacher.num_stepz=3",
     """error: the config has no key 'num_stepz'; Did you mean "num_steps" instead of "num_stepz"?"""),
    ("--config.teacher.num_steps=-1", "error: config.teacher.num_steps=-1: must be >= 0"),
    ("--config=configs/teacher.py:small", "error: config argument 'small': 'tiny'"),
    ("--config=configs/nowhere.py",
     f"error: --config=configs/nowhere.py: no such file; {_CONFIGS}"),
    ("--config=configs/common.py:tiny", "error: --config=configs/common.py:tiny: not a config file "
     f"(it has no get_config); {_CONFIGS}"),
    ("--config=configs/audio.py:tiny --config=configs/teacher.py:tiny",
     "error: --config given more than once (configs/audio.py:tiny, configs/teacher.py:tiny): "
     "give one")])
def test_cli_reports_a_config_mistake_in_one_line(tmp_path, override, message):
  """One line, and no trace of the run: no workdir (so no lock), no config dump."""
  args = (override.split(" ") if override.startswith("--config=")
          else ["--config=configs/teacher.py:tiny", override])
  result = _main(*args, f"--workdir={tmp_path / 'run'}")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and lines[-1].startswith(message), result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "config:" not in result.stderr
  assert not any(line.startswith("Pass --help") for line in lines)
  assert not (tmp_path / "run").exists()


def test_a_config_loads_from_any_directory(tmp_path):
  """--config=FILE and --config FILE, from another working directory: the folder holding
  configs/ goes on the path (the configs import configs.common); the config is read (its
  validation speaks) and nothing is written."""
  config = f"{ROOT}/configs/teacher.py:tiny"
  for spelling in ([f"--config={config}"], ["--config", config]):
    result = subprocess.run(
        [sys.executable, "-m", "avemo_jax.main", *spelling, "--config.teacher.num_steps=-1",
         f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.teacher.num_steps=-1: must be >= 0"), result.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


def test_a_tool_reports_a_missing_flag_in_one_line(tmp_path):
  """app.UsageError: one line, not the tool's whole help before it."""
  result = subprocess.run([sys.executable, "tools/predict.py", f"--export={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.strip().splitlines()[-1] == (
      "error: give either --video=FILE or --image=FILE (repeatable); --helpshort lists the flags")
  assert "USAGE" not in result.stderr and "flags:" not in result.stderr


def test_training_does_not_import_torch(tmp_path):
  """tensorboardX would import torch (installed by the test extra) into the training process and
  every Grain worker; the metric writer loads it without, and still writes event files."""
  code = ("import sys, pathlib; import avemo_jax.main; "
          "from avemo_jax.train.writer import MetricWriter; "
          f"w = MetricWriter(pathlib.Path({str(tmp_path)!r})); w.write(1, {{'loss': 0.5}}); "
          "w.close(); print('torch' in sys.modules)")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=True)
  assert done.stdout.split()[-1] == "False"  # not imported, nor left marked as missing
  assert list(tmp_path.glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
