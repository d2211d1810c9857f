"""Speed of the full-size models, side by side with the same networks in PyTorch (issue 8).

Every row times what training runs: the models come from `train.build` with the configs' sizes,
the states from `state.create`, the steps are `train.steps` jitted once with the state donated,
the inputs the pipeline's `pipeline.train_iterator`. The PyTorch peer (`benchmark_torch`, when
torch is installed) runs in the same process on the same batch, alternating with JAX rep by rep
(JAX, torch, JAX, ...) so that both see the same machine load; torch gets as many threads as
there are cores, which is what XLA's CPU client uses. Each rep is one step (or one pipeline
window); the first `warmup` reps are not counted. JAX runs on one device. The rows without a
peer (first step, input pipelines, prediction) are in `benchmark_host`, imported only when one
of them is asked for (the model rows need none of the data stack: Grain, tfds, PyAV, librosa);
what all rows share (settings, timing) in `benchmark_common`.
"""
import functools
import importlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from avemo_jax import hostmem
from avemo_jax.benchmark_common import Settings, alternate, cores, face_batch, machine
from avemo_jax.train import build, steps
from avemo_jax.train import state as state_lib

__all__ = ["ROWS", "Settings", "machine", "markdown", "num_params", "run"]

ROWS = ("face_train", "face_infer", "audio_train", "fusion_train", "fusion_infer",
        "first_step_cold_s", "first_step_warm_s", "pipeline_synthetic_per_core",
        "pipeline_arrayrecord_per_core", "predict_fps")
# Dense peak FLOP/s per chip (vendor data sheets) by device_kind substring: (float32 matmuls,
# which XLA runs as TF32 on these GPUs; bfloat16).
PEAK_FLOPS = {"h100": (494.7e12, 989.4e12), "h200": (494.7e12, 989.4e12),
              "a100": (156e12, 312e12), "l4": (60e12, 121e12), "tpu v4": (275e12, 275e12),
              "tpu v5 lite": (197e12, 197e12), "tpu v5p": (459e12, 459e12),
              "tpu v6": (918e12, 918e12)}


def _compiled(fn: Callable, *args, donate: bool) -> tuple[Callable, dict[str, float]]:
  """`fn` jitted and compiled ahead of time for `args` (as `parallel.ready` does; a train step
  is `donate`d), with its compile time and XLA's count of floating-point operations per call.
  The count is the lowered program's: after compilation for a GPU the convolutions are cuDNN
  custom calls that XLA counts as 0 FLOPs (an H200 run counted a quarter of the face train
  step's operations)."""
  start = time.perf_counter()
  with hostmem.gc_paused():  # as parallel.ready
    lowered = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*args)
    compiled = lowered.compile()
  info = {"compile_s": time.perf_counter() - start}
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  if cost and cost.get("flops"):
    info["gflop_per_call"] = float(cost["flops"]) / 1e9
  return compiled, info


def _jax_train(model, stage, inputs, step: Callable, batch) -> tuple[Callable, dict]:
  """A run of one train step (state carried from rep to rep, donated) and its compile info."""
  state = state_lib.create(model, stage, jax.random.key(0), inputs)
  batch = jax.device_put(batch)
  compiled, info = _compiled(step, state, batch, donate=True)
  held = [state]

  def run():
    held[0], metrics = compiled(held[0], batch)
    jax.block_until_ready((held[0], metrics))
  return run, info


def _jax_infer(fn: Callable, variables, *args) -> tuple[Callable, dict]:
  args = jax.device_put(args)
  compiled, info = _compiled(fn, variables, *args, donate=False)
  return lambda: jax.block_until_ready(compiled(variables, *args)), info


def _utilisation(row: dict[str, Any], info: dict[str, float], items: int, dtype: str) -> None:
  """Adds the achieved GFLOP/s (XLA's FLOP count x steps/s) and, on GPU/TPU, model FLOPs
  utilisation: that over the chip's dense peak (PEAK_FLOPS)."""
  if "gflop_per_call" not in info:
    return
  row["jax"]["gflop_s"] = info["gflop_per_call"] * row["jax"]["median"] / items
  if jax.default_backend() == "cpu":
    return
  kind = jax.devices()[0].device_kind.lower()
  peak = next((p for k, p in PEAK_FLOPS.items() if k in kind), None)
  row["jax"]["mfu"] = (row["jax"]["gflop_s"] * 1e9 / peak[dtype == "bfloat16"] if peak else
                       f"not measured: no peak FLOP/s known for {kind!r} (PEAK_FLOPS)")


class Peer:
  """The torch side: its device, threads and (bf16) autocast; imports torch only when made."""

  def __init__(self, dtype: str):
    import torch  # pylint: disable=import-outside-toplevel
    from avemo_jax import benchmark_torch  # pylint: disable=import-outside-toplevel
    self.torch, self.lib = torch, benchmark_torch
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    self.device = "cuda" if gpu else "cpu"
    torch.set_num_threads(cores())
    torch.manual_seed(0)
    self.autocast = dict(device_type=self.device, dtype=torch.bfloat16,
                         enabled=dtype == "bfloat16")

  def check(self, model, jax_params: int, what: str) -> Any:
    """`model` on the device, after checking that it has our parameter count."""
    n = self.lib.num_params(model) - self.lib.redundant_gru_biases(model)
    if n != jax_params:
      raise AssertionError(f"{what}: the torch peer has {n:,} parameters, ours {jax_params:,}")
    return model.to(self.device)

  def run(self, fn: Callable, batch) -> Callable[[], None]:
    batch = self.lib.to_torch(batch, self.device, nchw=True)

    def run():
      with self.torch.autocast(**self.autocast):
        fn(batch)
      self.lib.synchronize(self.device)
    return run


def num_params(variables) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def _rows(measured: dict[str, tuple[dict[str, Callable], dict]], items: int, unit: str,
          s: Settings, dtype: str, **extra) -> dict[str, dict]:
  """{row: alternate's stats of its runs, with its compile info and utilisation} for each
  `measured` row's (runs, info)."""
  rows = {}
  for name, (runs, info) in measured.items():
    rows[name] = alternate(runs, items, unit, s, name)
    rows[name]["jax"].update(info, **extra)
    _utilisation(rows[name], info, items, dtype)
  return rows


def face_rows(config, s: Settings, peer: Peer | None, want: set[str]) -> dict[str, dict]:
  """face_train (teacher step) and face_infer (eval-mode logits and embeddings), images/s: those
  in `want`."""
  model = build.face_model(config.model, dtype=config.dtype)
  stage, inputs = config.teacher, build.face_inputs(config.data.image_size)
  batch = face_batch(config, s.face_batch)
  init = lambda r: model.init(r, *inputs, train=False)
  if peer:
    params = num_params(jax.eval_shape(init, jax.random.key(1)))
    net = lambda: peer.check(peer.lib.FaceNet(config.model), params, "face network")
  measured = {}
  if "face_train" in want:
    step = functools.partial(steps.teacher_step, weights=dict(stage.loss),
                             margins=tuple(stage.triplet_margins))
    train, info = _jax_train(model, stage, inputs, step, batch)
    runs = {"jax": train}
    if peer:
      runs["torch"] = peer.run(peer.lib.train_step(net(), stage, peer.lib.face_loss(stage)), batch)
    measured["face_train"] = runs, info
  if "face_infer" in want:
    triplets = batch["triplets"]["images"]
    images = np.concatenate([batch["faces"]["image"], triplets.reshape(-1, *triplets.shape[2:])])
    infer, info = _jax_infer(functools.partial(steps.predict, apply_fn=model.apply),
                             jax.jit(init)(jax.random.key(1)), images)
    runs = {"jax": infer}
    if peer:
      runs["torch"] = peer.run(peer.lib.infer_step(net()), images)
    measured["face_infer"] = runs, info
  return _rows(measured, s.face_batch, "images/s", s, config.dtype)


def audio_rows(config, s: Settings, peer: Peer | None) -> dict[str, dict]:
  """audio_train: the VGGish clip-regression step, log-mel examples/s."""
  model, stage = build.audio_model(config.audio, dtype=config.dtype), config.audio.train
  rng = np.random.default_rng(0)
  batch = {"mel": rng.normal(size=(s.audio_batch, 96, 64)).astype(np.float32),
           "labels": rng.uniform(-1, 1, (s.audio_batch, 2)).astype(np.float32)}
  step = functools.partial(steps.audio_step, weights=dict(stage.loss))
  train, info = _jax_train(model, stage, build.audio_inputs(), step, batch)
  runs = {"jax": train}
  if peer:
    params = num_params(jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                          *build.audio_inputs())))
    net = peer.check(peer.lib.VGGish(config.audio), params, "VGGish")
    runs["torch"] = peer.run(peer.lib.train_step(net, stage, peer.lib.audio_loss(stage)), batch)
  return _rows({"audio_train": (runs, info)}, s.audio_batch, "examples/s", s, config.dtype)


def fusion_rows(config, s: Settings, peer: Peer | None, want: set[str]) -> dict[str, dict]:
  """fusion_train and fusion_infer: the fused (visual + audio) GRU model over `frames`-long
  sequences, sequences/s: those in `want`."""
  modalities, f, stage = ("visual", "audio"), config.fusion, config.fusion.train
  dims = {"visual": config.model.feature_dim, "audio": config.audio.embed_dim}
  model = build.fusion_model(f, modalities)
  rng, b, t = np.random.default_rng(0), s.fusion_batch, s.frames
  batch = {m: rng.normal(size=(b, t, d)).astype(np.float32) for m, d in dims.items()}
  batch.update(labels=rng.uniform(-1, 1, (b, t, 2)).astype(np.float32),
               lengths=np.full(b, t, np.int32))
  init = lambda: model.init(jax.random.key(1), *build.fusion_inputs(dims))
  if peer:
    params = num_params(jax.eval_shape(init))
    net = lambda: peer.check(peer.lib.FusionGRU(f, modalities, dims), params, "fusion GRU")
  measured = {}
  if "fusion_train" in want:
    # As in training, the step cuts its windows (here whole sequences) from the recordings.
    windows = {"recording": np.arange(b, dtype=np.int32), "start": np.zeros(b, np.int32)}
    step = lambda state, table_windows: steps.fusion_step(state, *table_windows, frames=t,
                                                          weights=dict(stage.loss), seed=0)
    train, info = _jax_train(model, stage, build.fusion_inputs(dims), step, (batch, windows))
    runs = {"jax": train}
    if peer:
      runs["torch"] = peer.run(peer.lib.train_step(net(), stage, peer.lib.fusion_loss(stage)),
                               batch)
    measured["fusion_train"] = runs, info
  if "fusion_infer" in want:
    variables, features = init(), {m: batch[m] for m in modalities}
    infer, info = _jax_infer(lambda v, x, n: model.apply(v, x, n)[0], variables, features,
                             batch["lengths"])
    if f.gru_kernel != "scan":
      info["vs_scan"] = kernel_agreement(model, variables, features, batch["lengths"])
    runs = {"jax": infer}
    if peer:
      runs["torch"] = peer.run(peer.lib.infer_step(net()), features)
    measured["fusion_infer"] = runs, info
  return _rows(measured, b, "sequences/s", s, "float32", gru_kernel=f.gru_kernel)


def kernel_agreement(model, variables, features, lengths) -> dict[str, float]:
  """How far `model`'s outputs and parameter gradients (of the outputs' sum) lie from those of
  the same model with the scan GRU: max |difference| over max |scan's|, the largest over the
  parameters (the GRU kernel's check on the device it runs on)."""
  def outputs_and_gradients(m):
    apply = lambda params: m.apply({"params": params}, features, lengths)[0]
    outputs, vjp = jax.vjp(apply, variables["params"])
    return outputs, vjp(jax.numpy.ones_like(outputs))[0]
  ours, scan = (jax.jit(outputs_and_gradients, static_argnums=0)(m)
                for m in (model, model.clone(gru_kernel="scan")))
  error = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)),
                       ours, scan)
  return {"outputs": error[0], "gradients": max(jax.tree.leaves(error[1]))}


def run(config: ml_collections.ConfigDict, s: Settings, only: tuple[str, ...] = ROWS
        ) -> dict[str, Any]:
  """The selected ROWS (reported in ROWS order); the PyTorch peer where `s.peer`."""
  unknown = set(only) - set(ROWS)
  if unknown:
    raise ValueError(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.dtype = build.dtype_name(config.dtype)  # "auto" -> what it means on this backend
  peer = Peer(config.dtype) if s.peer else None
  host = lambda: importlib.import_module("avemo_jax.benchmark_host")
  # A family sets up only the rows asked for (`want`): each other one would cost a compile and
  # its reps. The fresh first-step processes first, as a training process starts on an idle
  # machine: after the other rows (this process idle, 15 GB free) they took 2-4 s longer, for no
  # cause found.
  groups = (({"first_step_cold_s", "first_step_warm_s"},
             lambda want: host().first_step_rows(config, s, want)),
            ({"face_train", "face_infer"}, lambda want: face_rows(config, s, peer, want)),
            ({"audio_train"}, lambda want: audio_rows(config, s, peer)),
            ({"fusion_train", "fusion_infer"}, lambda want: fusion_rows(config, s, peer, want)),
            ({"pipeline_synthetic_per_core"}, lambda want: {
                "pipeline_synthetic_per_core": host().synthetic_pipeline_row(config, s)}),
            ({"pipeline_arrayrecord_per_core"}, lambda want: {
                "pipeline_arrayrecord_per_core": host().arrayrecord_pipeline_row(config, s)}),
            ({"predict_fps"}, lambda want: {"predict_fps": host().predict_row(s)}))
  results = {}
  for names, measure in groups:
    if names & set(only):
      results.update(measure(names & set(only)))
  return {k: results[k] for k in ROWS if k in results}


def _cell(side: dict[str, Any] | None) -> str:
  if side is None:
    return ""
  return f"{side['median']:.3g} ({side['min']:.3g}-{side['max']:.3g}, n={side['reps']})"


def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown table: median (min-max, reps) per side, and the ratio."""
  lines = ["| row | JAX | PyTorch | JAX / PyTorch | unit |", "|---|---|---|---|---|"]
  for name, row in results.items():
    if not isinstance(row, dict):
      lines.append(f"| {name} | {row:.1f} | | | s |")
    elif "not_measured" in row:
      lines.append(f"| {name} | {row['not_measured']} | | | |")
    else:
      ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
      lines.append(f"| {name} | {_cell(row['jax'])} | {_cell(row.get('torch'))} | {ratio} | "
                   f"{row['jax']['unit']} |")
  return "\n".join(lines) + "\n"
