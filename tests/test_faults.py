"""Fault injection on the real command line: a `configs/audio.py:tiny` run is killed with SIGTERM,
SIGKILL, SIGTERM and SIGKILL at random steps and restarted each time; it ends bit for bit where an
uninterrupted run ends (parameters, optimizer state, metrics, summary)."""
import json
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 14
ARGS = ("--config=configs/audio.py:tiny", f"--config.audio.train.num_steps={STEPS}",
        "--config.audio.train.log_every=1", "--config.audio.train.checkpoint_every=2",
        "--config.audio.train.eval_every=0")


def _command(workdir) -> list[str]:
  return [sys.executable, "-m", "avemo_jax.main", *ARGS, f"--workdir={workdir}"]


def _run(workdir, kill_at: int | None = None, sig=None) -> int:
  """Runs to the end, or sends `sig` once the log says step `kill_at` is done; the exit code."""
  proc = subprocess.Popen(_command(workdir), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                          stdout=subprocess.DEVNULL, env=os.environ.copy())
  log = []
  for line in proc.stderr:
    log.append(line)
    if kill_at is not None and f"[audio] step {kill_at}/{STEPS}" in line:
      proc.send_signal(sig)
      kill_at = None
  code = proc.wait(timeout=300)
  assert code in (0, 143, -signal.SIGKILL), "".join(log[-40:])
  return code


def _final(workdir):
  path = workdir / "audio" / "checkpoints" / str(STEPS) / "state"
  state = ocp.StandardCheckpointer().restore(path)
  metrics = [json.loads(l) for l in (workdir / "audio" / "metrics.jsonl").open()]
  for m in metrics:  # timings differ between runs, nothing else may
    m.pop("steps_per_sec", None), m.pop("data_wait_frac", None)
  summary = json.loads((workdir / "summary.json").read_text())
  summary["audio"].pop("train_seconds")
  return state, metrics, summary


def test_sigterm_and_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path):
  rng = random.Random(os.environ.get("AVEMO_FAULT_SEED", "0"))
  # Four interruptions at random, increasing steps, each restart resuming from the last one;
  # two steps apart at least, so that the step after a SIGTERM's checkpoint is still ahead.
  kills = zip(sorted(rng.sample(range(2, STEPS - 1, 2), 4)),
              (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL))
  assert _run(tmp_path / "ref") == 0
  checkpoints = tmp_path / "run" / "audio" / "checkpoints"
  for step, sig in kills:
    code = _run(tmp_path / "run", step, sig)  # SIGKILL may land mid-step or mid-checkpoint
    if sig == signal.SIGTERM:
      assert code == 143
      steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
      # the preemption checkpoint (at the step boundary after the signal) is the newest
      assert step <= steps[-1] < STEPS, (step, steps)
  assert _run(tmp_path / "run") == 0
  ref_state, ref_metrics, ref_summary = _final(tmp_path / "ref")
  state, metrics, summary = _final(tmp_path / "run")
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  assert metrics == ref_metrics and summary == ref_summary
