"""Train state (params, BatchNorm statistics, optimizer) and its construction."""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from avemo_jax import hostmem
from avemo_jax.models import convert


class TrainState(train_state.TrainState):
  batch_stats: Any

  @property
  def variables(self) -> dict[str, Any]:
    if not self.batch_stats:
      return {"params": self.params}
    return {"params": self.params, "batch_stats": self.batch_stats}


def hyperparameters(stage: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The optimizer's settings from a stage's config, as the optimizer state holds them."""
  values = dict(learning_rate=stage.learning_rate, warmup_steps=stage.warmup_steps,
                decay_steps=max(stage.num_steps, stage.warmup_steps + 1),
                weight_decay=stage.weight_decay, grad_clip=stage.grad_clip)
  return {k: np.asarray(v, np.float32) for k, v in values.items()}


def warmup_cosine(count, learning_rate, warmup_steps, decay_steps):
  """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then cosine decay to 0 at
  `decay_steps`: optax.warmup_cosine_decay_schedule's values, written with jnp because optax's
  schedules check their step counts in Python and so cannot take them as arrays."""
  count = jnp.asarray(count, jnp.float32)
  warm = learning_rate * count / jnp.maximum(warmup_steps, 1.0)
  done = jnp.clip((count - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
  cosine = 0.5 * learning_rate * (1.0 + jnp.cos(jnp.pi * done))
  return jnp.where(count < warmup_steps, warm, cosine)


def schedule(stage: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate at each optimizer step."""
  h = hyperparameters(stage)
  return functools.partial(warmup_cosine, learning_rate=h["learning_rate"],
                           warmup_steps=h["warmup_steps"], decay_steps=h["decay_steps"])


def decayed(params: Any) -> Any:
  """True for the kernels of convolutions and dense layers: weight decay leaves biases and
  BatchNorm scales and offsets alone, as usual (they do not set a layer's capacity)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def _decay_kernels(weight_decay) -> optax.GradientTransformation:
  """`optax.add_decayed_weights` of the `decayed` leaves. By hand: its `mask` (optax.masked)
  changes the optimizer state's tree, and checkpoints of earlier runs would no longer resume."""
  def update(updates, state, params):
    decay = lambda u, p, on: u + weight_decay * p if on else u
    return jax.tree.map(decay, updates, params, decayed(params)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adamw(learning_rate, warmup_steps, decay_steps, weight_decay, grad_clip
           ) -> optax.GradientTransformation:
  rate = functools.partial(warmup_cosine, learning_rate=learning_rate,
                           warmup_steps=warmup_steps, decay_steps=decay_steps)
  adamw = optax.chain(optax.scale_by_adam(), _decay_kernels(weight_decay),
                      optax.scale_by_learning_rate(rate))  # optax.adamw's chain
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def make_optimizer(stage: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm clipping, decaying kernels only. Its settings are
  arrays of the optimizer state (`optax.inject_hyperparams`), inputs of the compiled step rather
  than constants in it: runs and stages that differ in them alone (`num_steps`, `learning_rate`,
  ...) share one compiled step, from the persistent compilation cache too."""
  return optax.inject_hyperparams(_adamw)(**hyperparameters(stage))


def with_hyperparameters(state: TrainState, values: dict[str, jax.Array]) -> TrainState:
  """`state` with the optimizer's settings replaced (a restored state takes its config's, as a
  fresh one does: the checkpoint's may be of another `num_steps`)."""
  return state.replace(opt_state=state.opt_state._replace(hyperparams=dict(values)))


def create(model: nn.Module, stage: ml_collections.ConfigDict, rng: jax.Array,
           inputs: tuple[Any, ...], variables: dict[str, Any] | None = None) -> TrainState:
  """Initialises on example `inputs`, or wraps a copy of given variables (the train step donates
  the state, and `variables` may be a teacher's). Models without BatchNorm get empty
  `batch_stats`. One program makes the whole state, variables and optimizer state: eagerly, each
  optimizer array shape was a small program compiled of its own (38 for the `:tiny` face state;
  making it took 6.5 s instead of 4.7 on 2 AMD Zen 3 cores, the full one 11.7 instead of 10)."""
  tx = make_optimizer(stage)

  def initial_state(rng, inputs, variables, settings):
    if variables is None:
      variables = model.init(rng, *inputs, train=False)
    else:  # own buffers (a copy is never an input forwarded as the output)
      variables = jax.tree.map(jnp.copy, variables)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), tx=tx)
    # The optimizer's settings as inputs, not constants: one program for any of them.
    state = with_hyperparameters(state, settings)
    # A Python-int step is weakly typed; the step's output is not: the jit would compile twice.
    return state.replace(step=jnp.zeros((), jnp.int32))

  # Run once: compiled without XLA's backend optimisations (full face network on 2 CPU cores:
  # 8.7 -> 5.1 s to compile, 0.08 -> 0.49 s to run); inside a trace (eval_shape) a plain jit.
  traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rng, inputs, variables)))
  options = None if traced else {"xla_backend_optimization_level": 0}
  with hostmem.gc_paused():
    return jax.jit(initial_state, compiler_options=options)(rng, inputs, variables,
                                                            hyperparameters(stage))


def start_from(state: TrainState, path: str, kind: str, *, what: str, section: str,
               at: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> TrainState:
  """`state` with its variables under `at` taken from converted pretrained weights (the output
  folder of tools/convert_{kind}.py); only the entries named in `keep` stay as initialised.
  `what` (the config key) and `section` (the model's config section) name the fix in errors."""
  if isinstance(state.step, jax.core.Tracer):  # under jax.eval_shape: the shapes stay; not read
    return state
  converted, info = convert.load(path, kind, what)
  fix = (f"{path} holds {kind} weights for {info.get('model')} (its conversion.json): set "
         f"{section} to match, or leave {what} empty.")
  variables = convert.graft(state.variables, converted, at=at, keep=keep, what=f"{what}={path!r}",
                            fix=fix)
  return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))
