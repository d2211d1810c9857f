"""Train state (params, BatchNorm statistics, optimizer) and its construction."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
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


def schedule(stage: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to the peak learning rate, then cosine decay to 0 at the last step."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=stage.learning_rate, warmup_steps=stage.warmup_steps,
      decay_steps=max(stage.num_steps, stage.warmup_steps + 1))


def make_optimizer(stage: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW on the schedule, after global-norm clipping."""
  return optax.chain(
      optax.clip_by_global_norm(stage.grad_clip),
      optax.adamw(schedule(stage), weight_decay=stage.weight_decay))


def create(model: nn.Module, stage: ml_collections.ConfigDict, rng: jax.Array,
           inputs: tuple[Any, ...], variables: dict[str, Any] | None = None) -> TrainState:
  """Initialises on example `inputs`, or wraps a copy of given variables (the train step donates
  the state, and `variables` may be a teacher's). Models without BatchNorm get empty
  `batch_stats`. One program makes the whole state, variables and optimizer state: eagerly, each
  optimizer array shape was a small program compiled of its own (38 for the `:tiny` face state;
  making it took 6.5 s instead of 4.7 on 2 AMD Zen 3 cores, the full one 11.7 instead of 10)."""
  tx = make_optimizer(stage)

  def initial_state(rng, inputs, variables):
    if variables is None:
      variables = model.init(rng, *inputs, train=False)
    else:  # own buffers (a copy is never an input forwarded as the output)
      variables = jax.tree.map(jnp.copy, variables)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables.get("batch_stats", {}), tx=tx)
    # A Python-int step is weakly typed; the step's output is not: the jit would compile twice.
    return state.replace(step=jnp.zeros((), jnp.int32))

  # Run once: compiled without XLA's backend optimisations (full face network on 2 CPU cores:
  # 8.7 -> 5.1 s to compile, 0.08 -> 0.49 s to run); inside a trace (eval_shape) a plain jit.
  traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rng, inputs, variables)))
  options = None if traced else {"xla_backend_optimization_level": 0}
  with hostmem.gc_paused():
    return jax.jit(initial_state, compiler_options=options)(rng, inputs, variables)


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
