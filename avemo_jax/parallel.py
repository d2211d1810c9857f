"""Data parallelism over every device of every process, with JAX's own runtime.

One mesh axis, "data", over all devices of all processes: parameters and optimizer state are
replicated, every batch is sharded along its leading dimension. Two backends run the same step:

- "jit" (default): the global step is compiled once with `NamedSharding`s and XLA inserts the
  collectives, so BatchNorm statistics and batch-level losses (CCC) are global-batch ones;
- "pmap": the step runs per device with `axis_name` set: BatchNorm averages its statistics over
  the axis, model outputs are gathered over it before the losses, gradients are averaged.

Each process reads only its share of every global batch (`shard_stream`), and the global batch
is assembled with `jax.make_array_from_process_local_data` (on one process's CPU devices, by the
compiled step's call from the host arrays: `DataParallel.batch`).
"""
import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from avemo_jax import compile_cache, hostmem

AXIS = "data"
BACKENDS = ("jit", "pmap")


def initialize(p: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when configured (`coordinator_address`, or `distributed="on"`)
  or, with `distributed="auto"`, when a multi-process launch is detected (TPU VM pod, SLURM,
  Open MPI: JAX then finds the coordinator and this process's rank itself); and the persistent
  compilation cache (`compile_cache.use`). Call it first."""
  compile_cache.use(p.compilation_cache)
  if p.distributed not in ("auto", "on", "off"):
    raise ValueError(f"config.parallel.distributed={p.distributed!r}: 'auto', 'on' or 'off'")
  if p.coordinator_address:
    jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id)
  elif p.distributed == "on" or (p.distributed == "auto" and _launched_multiprocess()):
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d of %d devices local", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _launched_multiprocess() -> bool:
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def is_main_process() -> bool:
  """Process 0 writes metrics, summaries and plots; every process joins in checkpoints."""
  return jax.process_index() == 0


def process_batch(global_batch: int, what: str) -> int:
  """This process's share of a global batch; it must split into whole per-device batches."""
  devices = jax.device_count()
  if global_batch <= 0 or global_batch % devices:
    fit = max(devices, global_batch // devices * devices)
    raise ValueError(
        f"config {what}={global_batch} is a global batch: it must be a positive multiple of the "
        f"{devices} devices ({jax.process_count()} process(es)); e.g. --config.{what}={fit}")
  return global_batch // jax.process_count()


def shard_stream(ds: grain.MapDataset) -> grain.MapDataset:
  """Every process_count-th example, from this process's index: the processes' batches of the
  same step together hold exactly the examples of the single-process global batch."""
  return ds[jax.process_index()::jax.process_count()]


def local(tree: Any) -> Any:
  """Replicated arrays as single-device arrays on this process's first device: evaluation and
  feature extraction run whole in every process, without collectives."""
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


class DataParallel:
  """Places state and batches for one backend and compiles steps for it."""

  def __init__(self, backend: str = "jit", devices: list[jax.Device] | None = None):
    """Over all devices of all processes, or the given ones (one process: tests, debugging)."""
    if backend not in BACKENDS:
      raise ValueError(f"config.parallel.backend={backend!r}: choose from {BACKENDS}")
    if backend == "pmap" and jax.process_count() > 1:
      raise ValueError("config.parallel.backend='pmap' runs in one process; use 'jit' for "
                       "multi-process training")
    self.backend = backend
    self.axis_name = AXIS if backend == "pmap" else None  # for BatchNorm in pmap'd models
    devices = jax.devices() if devices is None else devices
    self.mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,),
                              devices=devices)
    self._barriers = 0
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
    # `batch` hands host arrays to the step (see there); tests turn it off to compare.
    self.keep_host_batches = jax.process_count() == 1 and all(d.platform == "cpu" for d in devices)

  def put(self, tree: Any) -> Any:
    """Replicates a state (or any tree of arrays) over all devices."""
    if self.backend == "pmap":
      return jax.device_put(tree, self.replicated)  # pmap takes it unmapped (in_axes=None)
    return jax.tree.map(lambda x: _replicate(x, self.replicated), tree)

  def abstract(self, tree: Any) -> Any:
    """The shapes and dtypes of `tree` placed as `put` places it: a template to restore into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        tree)

  def template(self, init: Callable[[], Any]) -> Any:
    """`abstract` of what `init()` returns, traced (`jax.eval_shape`, collector paused), not
    run: the state a step is compiled for (`start`) or a checkpoint is restored into."""
    with hostmem.gc_paused():
      return self.abstract(jax.eval_shape(init))

  def batch(self, local_batch: Any) -> Any:
    """This process's share of a batch -> the global batch (jit) or a per-device stack (pmap).

    On one process's CPU devices the jit backend keeps the host arrays: the compiled step's call
    copies them in C++ (~1 us for a fusion batch) where `jax.make_array_from_process_local_data`
    takes ~55 us of Python per array, whose GIL the step's thread waits for (2 cores: fusion
    steps 0.4 ms of 4 in taking a ready batch, 0.06 without)."""
    if self.backend == "pmap":
      n = self.mesh.size
      return jax.tree.map(lambda x: np.reshape(x, (n, -1, *np.shape(x)[1:])), local_batch)
    if self.keep_host_batches:
      return jax.tree.map(np.asarray, local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)),
        local_batch)

  def compile(self, step: Callable, num_args: int) -> Callable:
    """`step(state, *args, batch, axis_name=None)`, compiled once; the state is donated and the
    `num_args` extra arguments (e.g. a frozen teacher) are replicated like the state."""
    if self.backend == "pmap":
      return jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS,
                      in_axes=(None,) * (1 + num_args) + (0,), out_axes=None,
                      devices=self.mesh.devices.tolist())
    return jax.jit(step, in_shardings=(self.replicated,) * (1 + num_args) + (self.sharded,),
                   out_shardings=self.replicated, donate_argnums=0)

  def ready(self, step: Callable, *args: Any) -> Callable:
    """`step` (from `compile`) compiled ahead of time for `args`. With several processes it
    returns once every process has compiled it, so that its first collective finds them all:
    that one sets up the processes' communicator, and on CPU (gloo) waits for a late process
    only 30 s, less than a compilation can take on a busy machine."""
    return self._compiled(_lowered(step, *args))

  def _compiled(self, lowered: Any) -> Callable:
    with hostmem.gc_paused():
      compiled = lowered.compile()
    if jax.process_count() > 1:
      self._barriers += 1
      ocp.multihost.sync_global_processes(f"avemo_jax_compiled_{self._barriers}", timeout=3600,
                                          processes=set(range(jax.process_count())))
    return compiled

  def start(self, step: Callable, init: Callable[[], Any], template: Any, *args: Any
            ) -> tuple[Any, Callable]:
    """(`put(init())`, `ready(step, template, *args)`): the state is made in a thread while the
    step compiles here for `template` (`self.template(init)`). The face network on 2 CPU cores:
    10-11 s to make its state, 20-23 s to compile its step; 33.5 -> 27.5 s to the first step.
    The thread starts once the step is lowered: tracing and lowering both are Python, and the
    state's would hold the GIL against the step's (2 AMD Zen 3 cores, warm cache, the
    benchmark's first step: 18.7, 19.3 -> 14.9, 17.0 s; cold 32.7, 33.2 -> 34.0, 34.6 s, the
    state's compilation then beside the step's instead of its tracing). Errors in `init` are
    raised here, once the step has compiled."""
    def make():
      began = time.perf_counter()
      state = jax.block_until_ready(self.put(init()))
      return state, time.perf_counter() - began

    began = time.perf_counter()
    lowered = _lowered(step, template, *args)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="avemo_init") as pool:
      made = pool.submit(make)
      compiled = self._compiled(lowered)
      compiled_s = time.perf_counter() - began
      state, made_s = made.result()
    logging.info("state made in %.1fs while the step compiled in %.1fs", made_s, compiled_s)
    # In the template's tree structure: TrainState's optimizer and apply_fn are static fields,
    # another init() call makes other (equal-acting) ones, and the compiled step checks them.
    return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(state)), compiled


def _lowered(step: Callable, *args: Any) -> Any:
  with hostmem.gc_paused():
    return step.lower(*args)


def _replicate(x: Any, sharding: NamedSharding) -> Any:
  """`x` as a global array with `sharding`; in several processes `x` must be the same in each."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda y: y, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
