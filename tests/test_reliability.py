"""Faults: non-finite steps stop (or are skipped) and change nothing; SIGTERM checkpoints at the
next step boundary and the resumed run ends where an uninterrupted one does; the logged data wait
is the time the devices sat idle for want of a batch."""
import functools
import json
import os
import signal
import threading
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avemo_jax import parallel
from avemo_jax.train import checkpoint, loop, provenance, steps
from avemo_jax.train import workdir as workdir_lib
from avemo_jax.train import state as state_lib
from avemo_jax.train.writer import MetricWriter
from configs import common, fusion, teacher

POISON = 9  # example index with a NaN target: in the third batch of 4


def _example(i: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(i)
  x = rng.normal(size=3).astype(np.float32)
  y = np.float32(np.nan if i == POISON else x @ np.array([1.0, -2.0, 0.5]))
  return {"x": x, "y": np.array([y], np.float32)}


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool = False):
    return nn.Dense(1)(x)


def _toy_step(state, batch, axis_name=None):
  def loss_fn(params):
    pred = state.apply_fn({"params": params}, batch["x"])
    return jnp.mean(jnp.square(pred - batch["y"])), (state.batch_stats, {})
  return steps._apply_gradients(state, loss_fn, axis_name)


def _config(**overrides):
  cfg = common.schedule_config(True, steps=12, lr=0.05)
  cfg.update({"num_steps": 12, "log_every": 4, "eval_every": 0, "checkpoint_every": 2,
              **overrides})
  return cfg


def _train(workdir, cfg, *, poison=True, batches=None, step=_toy_step, before_init=lambda: None,
           evaluate=lambda s: {}, trained_from=None):
  examples = grain.MapDataset.range(200).map(
      lambda i: _example(int(i) if poison else int(i) + 1000))
  init = lambda: before_init() or state_lib.create(_Linear(), cfg, jax.random.key(0),
                                                   (jnp.zeros((1, 3)),))
  stage = loop.Stage(name="toy", config=cfg, step=step, step_args=(), init=init,
                     batches=batches or iter(examples.batch(4).to_iter_dataset()),
                     evaluate=evaluate, trained_from=trained_from)
  return loop.train(stage, workdir, max_checkpoints=3,
                    parallel=parallel.DataParallel("jit", devices=jax.devices()[:1]))


def test_a_nonfinite_step_changes_nothing():
  cfg = _config()
  state = state_lib.create(_Linear(), cfg, jax.random.key(0), (jnp.zeros((1, 3)),))
  batch = {"x": np.ones((4, 3), np.float32), "y": np.full((4, 1), np.nan, np.float32)}
  after, metrics = jax.jit(_toy_step)(state, batch)
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, after, state)  # params, optimizer, step
  batch["y"][:] = 1.0
  after, metrics = jax.jit(_toy_step)(state, batch)
  assert float(metrics["nonfinite"]) == 0.0 and int(after.step) == 1


def test_a_finite_loss_with_a_nonfinite_gradient_changes_nothing():
  def sqrt_step(state, batch):  # d sqrt(r^2) / dr at r = 0 is 0/0
    def loss_fn(params):
      pred = state.apply_fn({"params": params}, batch["x"])
      return jnp.mean(jnp.sqrt(jnp.square(pred - batch["y"]))), (state.batch_stats, {})
    return steps._apply_gradients(state, loss_fn)
  state = state_lib.create(_Linear(), _config(), jax.random.key(0), (jnp.zeros((1, 3)),))
  x = np.ones((4, 3), np.float32)
  y = np.asarray(state.apply_fn({"params": state.params}, x))
  after, metrics = jax.jit(sqrt_step)(state, {"x": x, "y": y})
  assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["nonfinite"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, after, state)


def test_nonfinite_stops_naming_step_terms_and_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.NonFiniteError) as info:
    _train(tmp_path, _config())
  message = str(info.value)
  assert "[toy] step 3: non-finite grad_norm, loss (the step changed nothing)" in message
  assert f"Last good checkpoint: step 2 in {tmp_path / 'checkpoints'}" in message
  assert "on_nonfinite='skip'" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # complete, only


def test_nonfinite_skip_counts_and_finishes(tmp_path):
  state, _ = _train(tmp_path, _config(on_nonfinite="skip"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert int(state.step) == 11  # 12 steps, one of which changed nothing
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [l for l in lines if "loss" in l]
  assert [l["skipped_steps"] for l in logged] == [1, 1, 1]
  assert all(np.isfinite(l["loss"]) for l in logged)
  # Taken by the loop at log time, of the parameters then: the last window's is the final one.
  assert logged[-1]["param_norm"] == pytest.approx(float(optax.tree.norm(state.params)), 1e-6)
  assert logged[0]["param_norm"] != logged[-1]["param_norm"]


def test_a_resumed_stage_takes_its_configs_optimizer_settings(tmp_path):
  """The optimizer's settings live in the optimizer state, so a checkpoint holds them too; a
  resumed stage replaces them with its config's, as a fresh one starts with them: resumed with
  more steps and another learning rate, the schedule is the new config's."""
  _train(tmp_path, _config(num_steps=4), poison=False)
  cfg = _config(num_steps=8, learning_rate=0.02, weight_decay=0.3)
  state, _ = _train(tmp_path, cfg, poison=False)
  assert int(state.step) == 8
  hyper = {k: float(v) for k, v in jax.device_get(state.opt_state.hyperparams).items()}
  assert hyper == {k: float(v) for k, v in state_lib.hyperparameters(cfg).items()}
  assert hyper["decay_steps"] == 8 and hyper["learning_rate"] == pytest.approx(0.02)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["learning_rate"] for l in lines if l["step"] == 8 and "loss" in l] == pytest.approx(
      [float(state_lib.schedule(cfg)(7))])


class _Wrapped:
  """A checkpointable iterator around another, whose state it keeps."""

  def __init__(self, inner):
    self.inner = inner

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


class _TermAt(_Wrapped):
  """Wraps a checkpointable iterator and sends this process SIGTERM while producing the
  batch of step `at` (the signal lands mid-step, as a real preemption would). The loop's
  prefetch thread reads ahead, so the loop is then at one of the steps `preempted_steps(at)`."""

  def __init__(self, inner, at: int):
    super().__init__(inner)
    self.at, self.calls = at, 0

  def __next__(self):
    self.calls += 1
    if self.calls == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.inner)


class _Slow(_Wrapped):
  """Wraps a checkpointable iterator: each batch takes `seconds` to read."""

  def __init__(self, inner, seconds: float):
    super().__init__(inner)
    self.seconds = seconds

  def __next__(self):
    time.sleep(self.seconds)
    return next(self.inner)


def _busy_step(products: int):
  """`_toy_step` after `products` 512x512 matrix products on the device (~1 ms each on a CPU core)."""
  def step(state, batch, axis_name=None):
    m = jnp.eye(512) + 1e-3 * jnp.mean(batch["x"])
    m = jax.lax.fori_loop(0, products, lambda _, m: jnp.tanh(m @ m), m)
    state, metrics = _toy_step(state, batch, axis_name)
    return state, {**metrics, "busy": jnp.mean(m)}
  return step


@pytest.mark.parametrize("read_s, products, low, high", [
    (0.05, 0, 0.6, 1.0),  # the pipeline is the bottleneck
    (0.04, 150, 0.0, 0.03),  # the main thread runs ahead and waits (7%), the devices do not
])
def test_data_wait_is_the_devices_idle_time(tmp_path, read_s, products, low, high):
  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))
  batches = _Slow(iter(examples.batch(4).to_iter_dataset()), read_s)
  _train(tmp_path, _config(checkpoint_every=100), batches=batches, step=_busy_step(products))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  waits = [l["data_wait_frac"] for l in lines if "data_wait_frac" in l]
  assert len(waits) == 3, lines  # the first window drains the batches read during compilation:
  assert all(low <= w <= high for w in waits[1:]), waits


def _preempted_steps(at: int) -> range:
  return range(at - loop.PREFETCH - 1, at + 1)  # the batches queued, one more being put


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path):
  cfg = _config(checkpoint_every=100)  # only the final and the preemption checkpoints
  reference, _ = _train(tmp_path / "ref", cfg, poison=False)
  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))
  batches = _TermAt(iter(examples.batch(4).to_iter_dataset()), at=5)
  with pytest.raises(loop.Preempted) as info:
    _train(tmp_path / "run", cfg, poison=False, batches=batches)
  assert info.value.code == 143 and info.value.step in _preempted_steps(5)
  assert signal.getsignal(signal.SIGTERM) is not None  # the loop put the old handler back
  assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [str(info.value.step)]
  resumed, _ = _train(tmp_path / "run", cfg, poison=False)
  jax.tree.map(np.testing.assert_array_equal, resumed.params, reference.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, reference.opt_state)


def test_a_sigterm_while_a_finished_stage_is_restored_is_not_lost(tmp_path):
  """(As one in its last step.) The next stage would not see it: Preempted (exit 143) with the
  checkpoint on disk; the rerun evaluates, and the metrics keep one final evaluation."""
  cfg = _config(checkpoint_every=100)
  evaluate = lambda s: {"norm": float(np.abs(s.params["Dense_0"]["kernel"]).sum())}
  _train(tmp_path, cfg, poison=False, evaluate=evaluate)
  with pytest.raises(loop.Preempted) as info:
    _train(tmp_path, cfg, poison=False, evaluate=evaluate,
           before_init=lambda: os.kill(os.getpid(), signal.SIGTERM))
  assert info.value.step == 12
  _train(tmp_path, cfg, poison=False, evaluate=evaluate)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [4, 8, 12, 12] and "eval_norm" in lines[-1]


def test_checkpoints_trained_from_other_inputs_are_set_aside(tmp_path, caplog):
  """A stage resumes only checkpoints trained from the same settings and inputs (here: another
  teacher); with others they go to stale/<n>/ and it trains again, from its first step, or takes
  back the training of these settings set aside before."""
  trained_from = lambda teacher: {"seed": 0, "teacher": teacher}
  _train(tmp_path, _config(), poison=False, trained_from=trained_from("a1"))
  longer = _config(num_steps=16, log_every=8)  # free to change: resumed from step 12
  _train(tmp_path, longer, poison=False, trained_from=trained_from("a1"))
  steps = lambda: [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").open()]
  assert steps() == [4, 8, 12, 12, 16, 16] and not (tmp_path / "stale").exists()
  _train(tmp_path, longer, poison=False, trained_from=trained_from("b2"))
  assert "trained from other settings or inputs (teacher: a1 -> b2)" in caplog.text
  assert steps() == [8, 16, 16]  # from the start
  assert sorted(p.name for p in (tmp_path / "stale" / "1" / "checkpoints").iterdir()) == [
      "12", "14", "16"]
  assert json.loads((tmp_path / "stale" / "1" / provenance.FILE).read_text())["teacher"] == "a1"
  assert json.loads((tmp_path / provenance.FILE).read_text())["teacher"] == "b2"
  _train(tmp_path, _config(num_steps=20, log_every=4), poison=False,
         trained_from=trained_from("a1"))  # a1's training back, resumed at 16; b2's aside
  assert steps() == [4, 8, 12, 12, 16, 16, 20, 20]
  assert sorted(p.name for p in (tmp_path / "stale").iterdir()) == ["2"]
  assert json.loads((tmp_path / "stale" / "2" / provenance.FILE).read_text())["teacher"] == "b2"


def test_stage_settings_leave_out_what_may_change():
  config, other = fusion.get_config("tiny"), fusion.get_config("tiny")
  other.teacher.num_steps, other.teacher.learning_rate, other.data.workers = 7, 0.5, 5
  keys = ("teacher", "model", "data", "seed")
  assert provenance.settings(other, *keys) == provenance.settings(config, *keys)
  other.teacher.loss.ce, other.data.image_size = 0.5, 64
  assert provenance.changes(provenance.settings(config, *keys),
                            provenance.settings(other, *keys, features="k1")) == [
      "data.image_size: 80 -> 64", "features: (none) -> k1", "teacher.loss.ce: 1.0 -> 0.5"]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
  """As a full disk or a crash leaves it; and an unreadable step kept aside twice."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 1.5}\n{"step": 8, "loss": 1.')
  writer = MetricWriter(tmp_path, resume_step=8)
  writer.write(9, {"loss": 1.25})
  writer.close()
  assert (tmp_path / "metrics.jsonl").read_text() == ('{"step": 4, "loss": 1.5}\n'
                                                     '{"step": 9, "loss": 1.25}\n')
  (tmp_path / "8.unreadable").mkdir()
  assert checkpoint._unused(tmp_path / "8.unreadable").name == "8.unreadable.2"


@pytest.mark.parametrize("every_secs, read_s, saved", [
    (60, 0.0, ["12"]),  # the interval counts from the start: no save at the first logging step
    (1, 0.3, None),  # 12 reads of 0.3 s: at least one logging step (4, 8) a second after a save
])
def test_checkpoints_by_time(tmp_path, every_secs, read_s, saved):
  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))
  batches = _Slow(iter(examples.batch(4).to_iter_dataset()), read_s)
  _train(tmp_path, _config(checkpoint_every=0, checkpoint_every_secs=every_secs), batches=batches)
  names = sorted((p.name for p in (tmp_path / "checkpoints").iterdir()), key=int)
  if saved is not None:
    assert names == saved
  else:
    assert names[-1] == "12" and set(names[:-1]) & {"4", "8"}, names


def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
  cfg = _config(checkpoint_every=4)
  reference, _ = _train(tmp_path / "ref", cfg, poison=False)
  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))
  with pytest.raises(loop.Preempted) as info:  # checkpoints 4, 8 and the preemption's (9-12)
    _train(tmp_path / "run", cfg, poison=False,
           batches=_TermAt(iter(examples.batch(4).to_iter_dataset()), at=12))
  step = info.value.step
  assert step in _preempted_steps(12)
  newest = tmp_path / "run" / "checkpoints" / str(step)
  files = [p for p in (newest / "state").rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(b"\x00garbage" * 3)
  resumed, _ = _train(tmp_path / "run", cfg, poison=False)  # from step 8, with a warning
  assert f"checkpoint step {step}" in caplog.text and "resuming from step 8" in caplog.text
  assert (tmp_path / "run" / "checkpoints" / f"{step}.unreadable").is_dir()
  jax.tree.map(np.testing.assert_array_equal, resumed.params, reference.params)


def test_a_checkpoint_of_another_model_is_an_error_not_a_fresh_start(tmp_path):
  _train(tmp_path, _config(checkpoint_every=4), poison=False)
  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))

  class Wider(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
      return nn.Dense(1)(nn.Dense(5)(x))

  stage = loop.Stage(name="toy", config=_config(), step=_toy_step, step_args=(),
                     init=lambda: state_lib.create(Wider(), _config(), jax.random.key(0),
                                                   (jnp.zeros((1, 3)),)),
                     batches=iter(examples.batch(4).to_iter_dataset()), evaluate=lambda s: {})
  with pytest.raises(ValueError, match=r"none of the checkpoints \[12, 8, 4\] in .*checkpoints "
                     r"reads back into this stage's model and optimizer"):
    loop.train(stage, tmp_path, max_checkpoints=3,
               parallel=parallel.DataParallel("jit", devices=jax.devices()[:1]))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "4", "8"]


def test_the_first_batches_are_read_while_the_state_is_made(tmp_path):
  """Grain's worker processes take seconds to start: the loop starts reading before it makes the
  state. Here the state is made only once the first example has been read."""
  read = threading.Event()
  examples = grain.MapDataset.range(200).map(lambda i: (read.set(), _example(int(i) + 1000))[1])

  def init():
    assert read.wait(timeout=60), "no batch was read while the state was being made"
    return state_lib.create(_Linear(), _config(), jax.random.key(0), (jnp.zeros((1, 3)),))

  stage = loop.Stage(name="toy", config=_config(), step=_toy_step, step_args=(), init=init,
                     batches=iter(examples.batch(4).to_iter_dataset()), evaluate=lambda s: {})
  state, _ = loop.train(stage, tmp_path, max_checkpoints=3,
                        parallel=parallel.DataParallel("jit", devices=jax.devices()[:1]))
  assert int(state.step) == 12


@pytest.mark.parametrize("backend", ["jit", "pmap"])
def test_the_step_compiles_while_the_state_is_made(tmp_path, backend):
  """A fresh stage's state is made in a thread while the step compiles for its shapes (here only
  once the step is being traced), and trains as when made first, under either backend."""
  tracing = threading.Event()

  def step(state, batch, axis_name=None):
    tracing.set()
    return _toy_step(state, batch, axis_name)

  def init():
    traced = isinstance(jnp.zeros(()), jax.core.Tracer)
    assert traced or tracing.wait(timeout=60), "the state was made before the step compiled"
    return state_lib.create(_Linear(), _config(), jax.random.key(0), (jnp.zeros((1, 3)),))

  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))
  stage = loop.Stage(name="toy", config=_config(), step=step, step_args=(), init=init,
                     batches=iter(examples.batch(4).to_iter_dataset()), evaluate=lambda s: {})
  state, _ = loop.train(stage, tmp_path / "run", max_checkpoints=3,
                        parallel=parallel.DataParallel(backend, devices=jax.devices()[:2]))
  reference, _ = _train(tmp_path / "ref", _config(), poison=False)
  assert int(state.step) == 12
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               jax.device_get(state.params), jax.device_get(reference.params))


def test_an_error_making_the_state_is_raised_once_the_step_has_compiled():
  def init():
    raise FileNotFoundError("config.init.face_backbone='/nowhere': no conversion.json")

  par = parallel.DataParallel("jit", devices=jax.devices()[:1])
  step = par.compile(lambda state, batch, axis_name=None: (state, {"loss": batch.sum()}), 0)
  template = par.abstract(jax.ShapeDtypeStruct((3,), jnp.float32))
  with pytest.raises(FileNotFoundError, match="no conversion.json"):
    par.start(step, init, template, par.batch(np.ones((4, 2), np.float32)))


def test_a_resumed_stage_only_traces_its_init(tmp_path):
  """Resuming, the state's values come from the checkpoint: `init` is traced for the shapes, not
  compiled and run."""
  first, _ = _train(tmp_path, _config(), poison=False)
  traced = []

  def init():
    traced.append(isinstance(jnp.zeros(()), jax.core.Tracer))
    return state_lib.create(_Linear(), _config(), jax.random.key(1), (jnp.zeros((1, 3)),))

  examples = grain.MapDataset.range(200).map(lambda i: _example(int(i) + 1000))
  stage = loop.Stage(name="toy", config=_config(), step=_toy_step, step_args=(), init=init,
                     batches=iter(examples.batch(4).to_iter_dataset()), evaluate=lambda s: {})
  resumed, _ = loop.train(stage, tmp_path, max_checkpoints=3,
                          parallel=parallel.DataParallel("jit", devices=jax.devices()[:1]))
  assert traced == [True]
  jax.tree.map(np.testing.assert_array_equal, resumed.params, first.params)


def test_one_run_per_workdir(tmp_path):
  with workdir_lib.exclusive(tmp_path):
    with pytest.raises(BlockingIOError, match=rf"{tmp_path} is in use by another run \(pid "
                       rf"{os.getpid()} on .*choose another --workdir"):
      with workdir_lib.exclusive(tmp_path):
        pass
  with workdir_lib.exclusive(tmp_path):  # released at exit
    pass


def test_config_paths_are_made_absolute(tmp_path, monkeypatch):
  """config.json names a run's inputs from any directory; URLs and unset paths stay."""
  monkeypatch.chdir(tmp_path)
  config = fusion.get_config("tiny")
  config.student_checkpoint, config.init.audio = "runs/a/student", "../weights/vggish"
  config.data.data_dir = "gs://bucket/data"
  workdir_lib.absolute_paths(config)
  assert config.student_checkpoint == str(tmp_path / "runs" / "a" / "student")
  assert config.init.audio == str(tmp_path.parent / "weights" / "vggish")
  assert config.data.data_dir == "gs://bucket/data" and config.teacher_checkpoint == ""
  workdir_lib.absolute_paths(teacher.get_config("tiny"))  # a config without some of the keys


def test_finished_run_is_recognised_by_its_config(tmp_path):
  config = fusion.get_config("tiny")
  assert workdir_lib.finished(config, tmp_path) is None
  workdir_lib.mark_finished(config, tmp_path, {"teacher": {"acc8": 0.5}})
  assert workdir_lib.finished(fusion.get_config("tiny"), tmp_path) == {"teacher": {"acc8": 0.5}}
  other_devices = fusion.get_config("tiny")
  other_devices.parallel.backend = "pmap"  # where it runs is not what it computes
  assert workdir_lib.finished(other_devices, tmp_path) is not None
  longer = fusion.get_config("tiny")
  longer.teacher.num_steps = 40
  assert workdir_lib.finished(longer, tmp_path) is None
