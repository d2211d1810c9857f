"""The training steps and the loop on `:tiny` configs: gradients, compilation, end to end, resume."""
import collections
import contextlib
import functools
import json
import logging
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avemo_jax.data import pipeline
from avemo_jax.train import build, stages, steps
from avemo_jax.train import state as state_lib
from avemo_jax.train.checkpoint import Checkpoints, load_variables
from configs import distill, teacher


def _tiny(config_module, **stage_overrides):
  config = config_module.get_config("tiny")
  for stage in ("teacher", "student"):
    for key, value in stage_overrides.items():
      config[stage][key] = value
  return config


@pytest.fixture(scope="module")
def setup():
  config = _tiny(distill)
  sources = pipeline.make_sources(config.data, config.seed)
  model = build.face_model(config.model)
  size = config.data.image_size
  teacher_state = state_lib.create(model, config.teacher, jax.random.key(0),
                                   build.face_inputs(size))
  batch = next(pipeline.train_iterator(config, "student", sources, seed=0))
  return config, model, teacher_state, batch


def test_teacher_receives_no_gradient(setup):
  config, _, teacher_state, batch = setup
  student = state_lib.create(build.face_model(config.model), config.student,
                             jax.random.key(1), build.face_inputs(config.data.image_size))
  cfg = config.student
  loss = functools.partial(steps.distill_loss, apply_fn=student.apply_fn, weights=dict(cfg.loss),
                           margins=tuple(cfg.triplet_margins), temperature=cfg.temperature)
  grad = jax.jit(jax.grad(lambda p, t: loss(p, student.batch_stats, t, batch)[0], argnums=(0, 1)))
  g_student, g_teacher = grad(student.params, teacher_state.variables)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(g_student))) > 0


def test_distill_step_compiles_once_and_leaves_teacher_unchanged(setup):
  config, model, teacher_state, _ = setup
  cfg = config.student
  teacher_vars = teacher_state.variables
  before = jax.tree.map(np.asarray, teacher_vars)
  state = state_lib.create(model, cfg, jax.random.key(1), build.face_inputs(80), teacher_vars)
  step = jax.jit(functools.partial(
      steps.distill_step, weights=dict(cfg.loss), margins=tuple(cfg.triplet_margins),
      temperature=cfg.temperature), donate_argnums=0)
  batches = pipeline.train_iterator(config, "student", pipeline.make_sources(config.data, 0), seed=3)
  for _ in range(3):
    state, metrics = step(state, teacher_vars, next(batches))
  assert step._cache_size() == 1
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  assert set(dict(cfg.loss)) <= set(metrics)  # every weighted term is logged
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, teacher_vars))


class _TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    del train
    return nn.Dense(23)(nn.Dense(37)(x))


def test_a_state_is_made_by_one_program(caplog):
  """Fresh or from given variables, the variables and the optimizer state come from one compiled
  program (eagerly, each optimizer array shape compiled one of its own; shapes of this test
  alone, so none was compiled before in this process)."""
  model = _TwoLayers()
  cfg = teacher.get_config("tiny").teacher
  inputs = (jnp.ones((2, 11)),)
  for variables in (None, model.init(jax.random.key(1), *inputs, train=False)):
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
      state = jax.block_until_ready(state_lib.create(model, cfg, jax.random.key(0), inputs,
                                                     variables))
    compiled = [r.getMessage() for r in caplog.records
                if "Finished XLA compilation" in r.getMessage()]
    assert len(compiled) == 1 and "initial_state" in compiled[0], compiled
    assert {p["kernel"].shape for p in state.params.values()} == {(11, 37), (37, 23)}
    assert int(state.step) == 0
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        state.tx.init(state.params))


def test_optimizer_settings_are_inputs_of_one_compiled_step():
  """Stages that differ only in their optimizer's settings lower to one program (the settings are
  arrays of the optimizer state), and each step is optax's AdamW on optax's warm-up + cosine
  schedule with those settings."""
  model, x = _TwoLayers(), jnp.ones((4, 11))
  grad = jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, train=True))))
  compiled = jax.jit(lambda state: state.apply_gradients(grads=grad(state.params)))
  base = teacher.get_config("tiny").teacher
  variants = [dict(), dict(num_steps=7, learning_rate=3e-2), dict(warmup_steps=0),
              dict(weight_decay=0.5, grad_clip=1e-3)]
  texts = set()
  for overrides in variants:
    cfg = base.copy_and_resolve_references()
    cfg.update(overrides)
    state = state_lib.create(model, cfg, jax.random.key(0), (x,))
    texts.add(compiled.lower(state).as_text())
    reference = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                           max(cfg.num_steps, cfg.warmup_steps + 1)),
        weight_decay=cfg.weight_decay, mask=state_lib.decayed))
    params, opt_state = state.params, reference.init(state.params)
    for _ in range(cfg.num_steps + 1):  # warm-up, decay and the step past its end
      state = compiled(state)
      updates, opt_state = reference.update(grad(params), opt_state, params)
      params = optax.apply_updates(params, updates)
    # float32 rounding, which Adam amplifies in entries whose gradient is near 0 (measured up to
    # 2.8e-7); a wrong step of the schedule would move entries by ~learning_rate.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6),
                 state.params, params)
  # One program, so one entry of the persistent compilation cache (keyed by the program's text;
  # each state's optimizer is a new Python object, so `jit` traces each state once).
  assert len(texts) == 1


def test_weight_decay_shrinks_kernels_only():
  """With zero gradients an AdamW step is the decay alone: kernels (convolutions, dense layers,
  GRU cells) shrink by learning rate x weight decay; biases and BatchNorm scales stay."""
  config = _tiny(distill)
  model, cfg = build.face_model(config.model), config.teacher
  cfg.update(warmup_steps=0, learning_rate=0.1, weight_decay=0.5)
  state = state_lib.create(model, cfg, jax.random.key(0), build.face_inputs(config.data.image_size))
  stepped = jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.zeros_like, s.params)))(
      state)
  flat = lambda tree: {"/".join(k): np.asarray(v)
                       for k, v in flax.traverse_util.flatten_dict(tree).items()}
  before, after = flat(state.params), flat(stepped.params)
  kinds = collections.Counter(k.rsplit("/", 1)[1] for k in before)
  assert kinds.keys() == {"kernel", "bias", "scale"} and min(kinds.values()) > 5, kinds
  for name, value in before.items():
    expected = value * (1 - 0.1 * 0.5) if name.endswith("/kernel") else value
    np.testing.assert_allclose(after[name], expected, rtol=1e-6, err_msg=name)
  # The optimizer state's tree is that of the unmasked AdamW before: those checkpoints resume.
  unmasked = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.constant_schedule(1e-3)))
  unmasked = unmasked.init(state.params)
  assert jax.tree.structure(state.opt_state.inner_state) == jax.tree.structure(unmasked)
  gru = nn.GRUCell(8)
  gru_params = gru.init(jax.random.key(0), gru.initialize_carry(jax.random.key(1), (1, 4)),
                        jnp.ones((1, 4)))["params"]
  assert {k for k, v in flat(state_lib.decayed(gru_params)).items() if v} == {
      k for k in flat(gru_params) if k.endswith("/kernel")} != set()


def test_variables_load_from_a_checkpoint_of_another_optimizer(tmp_path):
  """A teacher checkpoint (or an export's source) gives its variables whatever optimizer state
  was saved beside them: here plain Adam's, as written before the settings were injected.
  Resumed as a stage's own checkpoint, it is refused with the reason."""
  model, x = _TwoLayers(), jnp.ones((2, 11))
  variables = model.init(jax.random.key(3), x, train=False)
  other = state_lib.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                      batch_stats={}, tx=optax.adam(1e-3))
  checkpoints = Checkpoints(tmp_path / "checkpoints", 1)
  checkpoints.save(5, other, None)
  checkpoints.close()
  template = jax.eval_shape(lambda: state_lib.create(model, teacher.get_config("tiny").teacher,
                                                     jax.random.key(0), (x,)))
  loaded = load_variables(str(tmp_path), template, "config.teacher_checkpoint")
  assert set(loaded) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, loaded["params"], variables["params"])
  with pytest.raises(ValueError, match=r"here, not saved: \['opt_state\.count'.*only the "
                     r"optimizer state differs.*still serve as a teacher"):
    Checkpoints(tmp_path / "checkpoints", 1).restore_newest(template, None)  # as a resume


def test_worker_processes_give_the_same_batches_and_resume():
  """`data.workers` Grain processes: the batches of in-process reading, in order, and an iterator
  state that survives the checkpoint's JSON round trip and resumes with the other worker count
  (also Grain's own state, which checkpoints held before 2026-12-03)."""
  config = _tiny(distill)
  sources = pipeline.make_sources(config.data, config.seed)
  runs = {}
  for workers in (0, 2):
    config.data.workers = workers
    with contextlib.closing(pipeline.train_iterator(config, "student", sources, seed=0)) as batches:
      first = [next(batches) for _ in range(3)]
      states = [json.loads(json.dumps(batches.get_state())), batches._batches.get_state()]
      rest = [next(batches) for _ in range(2)]
    config.data.workers = 2 - workers
    for state in states:
      with contextlib.closing(pipeline.train_iterator(config, "student", sources,
                                                      seed=0)) as resumed:
        resumed.set_state(state)
        jax.tree.map(np.testing.assert_array_equal, rest, [next(resumed) for _ in range(2)])
    runs[workers] = first + rest
  jax.tree.map(np.testing.assert_array_equal, runs[0], runs[2])


def test_augment_against_hand_computation():
  """Crop from the edge-padded image, flip, then brightness, saturation (about each pixel's
  grey) and contrast (about the image mean), rounded to the nearest grey level."""
  image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), np.uint8)
  assert (pipeline.augment(image, np.random.default_rng(1), pad=0, flip=False, jitter=0)
          == image).all()
  for seed in range(4):
    out = pipeline.augment(image, np.random.default_rng(seed), pad=3, flip=True, jitter=0.3)
    rng = np.random.default_rng(seed)  # the same draws, in the same order
    top, left = rng.integers(0, 7, size=2)
    x = np.pad(image, ((3, 3), (3, 3), (0, 0)), mode="edge")[top:top + 12, left:left + 10]
    x = x[:, ::-1] if rng.random() < 0.5 else x
    brightness, contrast, saturation = 1 + rng.uniform(-0.3, 0.3, size=3)
    x = x.astype(np.float64) * brightness
    x = x.mean(-1, keepdims=True) + saturation * (x - x.mean(-1, keepdims=True))
    expected = np.round(np.clip(x.mean() + contrast * (x - x.mean()), 0, 255))
    diff = out.astype(np.float64) - expected  # float32 against float64: a .5 may round apart
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.abs(diff).max() <= 1 and np.abs(diff).mean() < 0.01


def test_small_datasets_come_in_equal_shares_in_a_new_order_every_pass():
  """9 recordings, drawn as blocks of 112 shuffled copies of each (Grain's shuffle is slow on
  small datasets): every recording equally often per block, in another order in each block."""
  config = _tiny(distill)
  lengths = np.full(9, 100, np.int32)
  with contextlib.closing(pipeline.chunk_iterator(lengths, seed=0, batch=8, frames=10,
                                                  data=config.data)) as batches:
    drawn = np.concatenate([next(batches)["recording"] for _ in range(2 * 1008 // 8)])
  first, second = drawn[:1008], drawn[1008:]
  for block in (first, second):
    np.testing.assert_array_equal(np.bincount(block, minlength=9), np.full(9, 112))
  assert not np.array_equal(first, second) and len(set(map(tuple, first.reshape(-1, 9)))) > 100


def test_evaluation_batches_are_read_in_order_each_time_and_padded():
  """The test set in fixed-size batches, read anew on every pass (never held whole); the last
  batch filled up with copies labelled -1, which the metrics leave out."""
  read = []

  class Source:
    def __len__(self):
      return 5

    def __getitem__(self, i):
      read.append(i)
      return {"image": np.full((2, 2), i, np.uint8), "label": i, "unused": None}

  batches = pipeline.eval_batches(Source(), 2, ("image", "label"), num_threads=2)
  for _ in range(2):
    got = list(batches)
    assert [b["label"].tolist() for b in got] == [[0, 1], [2, 3], [4, -1]]
    assert [b["image"][:, 0, 0].tolist() for b in got] == [[0, 1], [2, 3], [4, 4]]
  assert sorted(read) == sorted(list(range(5)) * 2)


def test_tiny_distill_end_to_end(tmp_path):
  summary = stages.run(_tiny(distill), tmp_path)
  for stage in ("teacher", "student"):
    for key in ("acc8", "acc7", "macro_f1", "fec_triplet_acc"):
      assert 0.0 <= summary[stage][key] <= 1.0
    lines = [json.loads(l) for l in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 20 and "eval_acc8" in lines[-1]
    assert any("loss" in l and "steps_per_sec" in l and "learning_rate" in l for l in lines)
    assert (tmp_path / stage / "confusion.png").stat().st_size > 10_000
    assert list((tmp_path / stage).glob("events.out.tfevents.*"))
  assert "teacher_agreement" in summary["student"]
  assert json.loads((tmp_path / "summary.json").read_text())["student"]["acc8"] == \
      summary["student"]["acc8"]
  assert (tmp_path / "sample_faces.png").stat().st_size > 50_000


def test_resume_equals_uninterrupted(tmp_path):
  config = _tiny(teacher, num_steps=8, checkpoint_every=4, eval_every=0, log_every=4)
  whole = stages.run(config, tmp_path / "whole")
  # Interrupted: the same run, with its newest checkpoint gone (as if killed after step 4).
  stages.run(config, tmp_path / "cut")
  ckpts = tmp_path / "cut" / "teacher" / "checkpoints"
  shutil.rmtree(ckpts / "8")
  resumed = stages.run(config, tmp_path / "cut")
  drop = lambda s: {k: v for k, v in s["teacher"].items() if k != "train_seconds"}
  assert drop(resumed) == drop(whole)
  # train_seconds: both runs' time to the last step (the first run's to step 4 is in that
  # checkpoint); a run that only re-evaluates the finished stage keeps it.
  saved = Checkpoints(ckpts, 2)
  first_run, both = saved.train_seconds(4), saved.train_seconds(8)
  saved.close()
  assert 0 < first_run < both == resumed["teacher"]["train_seconds"]
  assert stages.run(config, tmp_path / "cut")["teacher"]["train_seconds"] == both
  read = lambda d: [json.loads(l) for l in (d / "teacher" / "metrics.jsonl").read_text().splitlines()]
  losses = lambda d: [l["loss"] for l in read(d) if "loss" in l]
  assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_student_from_teacher_checkpoint(tmp_path):
  stages.run(_tiny(teacher, num_steps=2, eval_every=0), tmp_path / "t")
  config = _tiny(distill, num_steps=2, eval_every=0)
  config.stages = ("student",)
  config.teacher_checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    stages.run(config, tmp_path / "s")
  config.teacher_checkpoint = str(tmp_path / "t" / "teacher")
  summary = stages.run(config, tmp_path / "s")
  assert set(summary) == {"student"} and "teacher_agreement" in summary["student"]
