"""Data parallelism on the 8 fake CPU devices: one step on 1 device, on 8 devices (jit) and under
pmap gives the same parameters for the same global batch, each compiled once; checkpoints
written on 8 devices resume on 1 and back, and saving them compiles nothing; global batches
that do not split are refused; bf16 trains like float32; the compilation cache is the config's."""
import functools
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from avemo_jax import compile_cache, parallel
from avemo_jax.data import pipeline, sequences
from avemo_jax.train import build, loop, stages, steps
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import Checkpoints, load_variables
from configs import audio, common, distill, fusion

STEPS = 2


def _one_device() -> parallel.DataParallel:
  return parallel.DataParallel("jit", devices=jax.devices()[:1])


COMPILES = []  # one entry per executable compiled or read from the persistent cache
jax.monitoring.register_event_listener(
    lambda event, **_: COMPILES.append(event)
    if event == "/jax/compilation_cache/compile_requests_use_cache" else None)


def _train(par: parallel.DataParallel, step, state, args, batches):
  """STEPS steps of `step`, compiled by `par`; returns (host variables: parameters and BatchNorm
  statistics, the number of programs the steps compiled). The step keeps its name, so the
  8-device jit one is the loop's, cached by the suite's other runs of the same config."""
  state, args = par.put(jax.tree.map(np.array, state)), par.put(args)  # own buffers: donated
  fn = par.compile(step, len(args))
  before = len(COMPILES)
  for batch in batches:
    state, _ = fn(state, *args, par.batch(batch))
  return jax.device_get(state.variables), len(COMPILES) - before


@pytest.fixture(scope="module")
def face():
  """The :tiny config and each face stage's first batches, as the loop draws them."""
  config = distill.get_config("tiny")
  sources = pipeline.make_sources(config.data, config.seed)
  batches = {stage: pipeline.train_iterator(config, stage, sources, seed=0)
             for stage in ("teacher", "student")}
  return config, {stage: [next(it) for _ in range(STEPS)] for stage, it in batches.items()}


def _face_state(config, stage, axis_name=None, seed=0, variables=None):
  model = build.face_model(config.model, axis_name=axis_name)
  return state_lib.create(model, config[stage], jax.random.key(seed),
                          build.face_inputs(config.data.image_size), variables)


def _assert_same(a, b):
  """Same parameters to float32 tolerance. Sums over the batch run in another order, and Adam's
  first updates are lr * g / (|g| + eps): a gradient entry near zero (float32 rounding noise)
  can move by a fraction of the learning rate (1e-3 here), so atol is 1e-4; an entry whose
  gradient is pure rounding noise can move by up to 2 lr the other way, so one in a thousand
  may differ by up to 2e-3 (a different batch would move most entries by ~lr)."""
  def same(x, y):
    off = np.abs(x - y) > 1e-4 + 1e-3 * np.abs(y)
    assert off.mean() <= 1e-3 and np.abs(x - y).max() <= 2e-3, (off.mean(), np.abs(x - y).max())
  jax.tree.map(same, a, b)


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_face_steps_agree_on_1_and_8_devices_and_the_student_under_pmap(face, stage):
  config, batches = face
  cfg, batches = config[stage], batches[stage]
  kw = dict(weights=dict(cfg.loss), margins=tuple(cfg.triplet_margins))
  if stage == "teacher":
    step, args = functools.partial(steps.teacher_step, **kw), ()
  else:
    step = functools.partial(steps.distill_step, temperature=cfg.temperature, **kw)
    args = (_face_state(config, "teacher", seed=7).variables,)
  results = {}
  # pmap for the student step alone: the same loss terms and BatchNorm, and the teacher's
  # variables as an argument (one program less to compile in CI: ~30 s on 2 cores).
  for name, par in (("1", _one_device()), ("8", parallel.DataParallel("jit")),
                    *((("pmap", parallel.DataParallel("pmap")),) if stage == "student" else ())):
    state = _face_state(config, stage, axis_name=par.axis_name)
    results[name], compiled = _train(par, step, state, args, batches)
    assert compiled == 1, name
  for name in results:
    _assert_same(results[name], results["1"])


def _features(n: int, frames: int = 60) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  va = np.stack([np.stack([sequences.smooth_trajectory(rng, frames) for _ in range(2)], 1)
                 for _ in range(n)])
  return {"audio": (va @ rng.normal(size=(2, 8)) + 0.3 * rng.normal(size=(n, frames, 8))
                    ).astype(np.float32),
          "labels": va.astype(np.float32),
          "lengths": rng.integers(frames // 2, frames + 1, n).astype(np.int32)}


def _fusion_setup(**train):
  """`train` overrides config.fusion.train, which the state's optimizer settings come from."""
  config = fusion.get_config("tiny")
  cfg = config.fusion
  cfg.dropout = 0.0  # pmap draws its own dropout masks per device (see steps.fusion_step)
  cfg.train.update(train)
  model = build.fusion_model(cfg, ("audio",))
  state = state_lib.create(model, cfg.train, jax.random.key(0), build.fusion_inputs({"audio": 8}))
  table = _features(16)
  batches = pipeline.chunk_iterator(table["lengths"], seed=0, batch=cfg.train.batch, frames=40,
                                    data=config.data)
  step = functools.partial(steps.fusion_step, frames=40, weights={"ccc": 1.0, "mse": 1.0}, seed=0)
  return config, state, step, (table,), batches


def test_fusion_step_agrees_on_1_and_8_devices_and_under_pmap():
  """Also with the batches placed as several processes place them (on one process's CPU
  devices the step is handed host arrays)."""
  config, state, step, args, batches = _fusion_setup()
  batches = [next(batches) for _ in range(STEPS)]
  placed = parallel.DataParallel("jit")
  assert placed.keep_host_batches and isinstance(placed.batch(batches[0])["start"], np.ndarray)
  placed.keep_host_batches = False
  assert isinstance(placed.batch(batches[0])["start"], jax.Array)
  results = {}
  for name, par in (("1", _one_device()), ("8", parallel.DataParallel("jit")), ("8 placed", placed),
                    ("pmap", parallel.DataParallel("pmap"))):
    results[name], compiled = _train(par, step, state, args, batches)
    assert compiled == 1, name
  for name in ("8", "8 placed", "pmap"):
    _assert_same(results[name], results["1"])


@pytest.mark.parametrize("written, resumed", [(8, 1), (1, 8)])
def test_checkpoint_resumes_on_another_number_of_devices(tmp_path, written, resumed):
  """Train 6 steps on `written` devices (checkpoints at 3 and 6); drop step 6 and resume from
  step 3 on `resumed` devices: the result is the uninterrupted run's."""
  par = {1: _one_device(), 8: parallel.DataParallel("jit")}

  def run(workdir, devices):
    config, state, step, args, batches = _fusion_setup(num_steps=6, checkpoint_every=3,
                                                       log_every=3, eval_every=0)
    stage = loop.Stage(name="fusion", config=config.fusion.train, step=step, step_args=args,
                       init=lambda: state, batches=batches, evaluate=lambda s: {})
    final, _ = loop.train(stage, workdir, max_checkpoints=2, parallel=par[devices])
    return config, state, jax.device_get(final.params)

  config, template, uninterrupted = run(tmp_path / "a", written)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  _, _, resumed_params = run(tmp_path / "b", resumed)
  _assert_same(resumed_params, uninterrupted)
  restored = load_variables(str(tmp_path / "b"), template, "test")  # step 6 again
  _assert_same(jax.device_get(restored["params"]), uninterrupted)


def test_saving_a_state_on_8_devices_compiles_nothing(tmp_path, caplog):
  """Each replicated array is written once, from its first replica, not split among its 8
  replicas by eager slices (one small program compiled per slice shape; shapes of this test
  alone, so none was compiled before in this process)."""
  state = parallel.DataParallel("jit").put({"w": np.arange(4104.0), "b": np.ones((3, 41, 5))})
  checkpoints = Checkpoints(tmp_path, max_to_keep=1)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    checkpoints.save(1, jax.block_until_ready(state), None)
    checkpoints.manager.wait_until_finished()
  assert not [r.getMessage() for r in caplog.records if "compil" in r.getMessage()]
  restored = checkpoints.restore(parallel.DataParallel("jit").abstract(state), None)
  checkpoints.close()
  _assert_same(jax.device_get(restored), jax.device_get(state))


def test_global_batch_must_split_over_devices():
  assert parallel.process_batch(16, "teacher.batch_faces") == 16  # one process
  with pytest.raises(ValueError, match=r"teacher.batch_triplets=4 .* 8 devices.*=8"):
    parallel.process_batch(4, "teacher.batch_triplets")
  config = distill.get_config("tiny")
  config.teacher.batch_faces = 12
  with pytest.raises(ValueError, match="teacher.batch_faces=12"):
    pipeline.train_iterator(config, "teacher", pipeline.make_sources(config.data, 0), seed=0)


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="backend='tpu'"):
    parallel.DataParallel("tpu")


@pytest.mark.parametrize("env", [False, True])
def test_the_compilation_cache_is_the_configs_unless_jax_variable_sets_one(tmp_path, env):
  """`parallel.initialize` (the main job's first call) puts JAX's persistent compilation cache
  where `config.parallel.compilation_cache` says, "~" expanded; JAX_COMPILATION_CACHE_DIR (as
  the tests' conftest sets) wins."""
  code = ("import jax, jax.numpy as jnp; from avemo_jax import parallel; from configs import common; "
          "p = common.parallel_config(); p.compilation_cache = '~/xla'; parallel.initialize(p); "
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
          "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()")
  environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  environ["HOME"] = str(tmp_path)
  if env:
    environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "own")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-c", code], cwd=root, env=environ, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert {p.parent.name for p in tmp_path.glob("*/jit_*-cache")} == {"own" if env else "xla"}
  assert common.parallel_config().compilation_cache == compile_cache.DEFAULT  # the tools' cache


def test_bfloat16_trains_like_float32(tmp_path):
  """config.dtype=bfloat16 computes VGGish in bf16 (parameters, optimizer state and losses stay
  float32) and trains the :tiny audio encoder (50 steps) to the float32 run's quality: arousal
  CCC on the dev clips above 0.7 for both and within 0.05 of each other (measured: 0.87 / 0.88
  at 60 steps)."""
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = audio.get_config("tiny")
    config.dtype = dtype
    config.audio.train.num_steps, config.audio.train.eval_every = 50, 0
    results[dtype] = stages.run(config, tmp_path / dtype)["audio"]
  assert results["float32"]["ccc_arousal"] > 0.7, results
  assert abs(results["bfloat16"]["ccc_arousal"] - results["float32"]["ccc_arousal"]) < 0.05, results
  model = build.audio_model(config.audio, dtype="bfloat16")
  template = jax.eval_shape(lambda: state_lib.create(model, config.audio.train, jax.random.key(0),
                                                     build.audio_inputs()))
  variables = load_variables(str(tmp_path / "bfloat16" / "audio"), template, "test")
  assert {x.dtype for x in jax.tree.leaves(variables)} == {np.dtype("float32")}
  with pytest.raises(ValueError, match="float16"):
    build.audio_model(config.audio, dtype="float16")
