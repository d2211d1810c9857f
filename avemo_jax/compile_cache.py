"""JAX's persistent compilation cache for every entry point: the main job (its directory from
`config.parallel.compilation_cache`, set by `parallel.initialize`) and the tools that run models
(`tools/predict.py`, `tools/evaluate.py`). A process that compiles the same programs again (a
restarted run, the next video) loads their executables instead. JAX's own variables still rule:
JAX_COMPILATION_CACHE_DIR, when set, chooses the directory, JAX_ENABLE_COMPILATION_CACHE=false
turns the cache off."""
import os

import jax

DEFAULT = "~/.cache/avemo_jax/xla"  # as configs/common.py's parallel.compilation_cache


def use(path: str = DEFAULT) -> None:
  """The cache in `path` ("~" expanded; "" leaves it off), set before anything compiles
  (`configs/teacher.py`, 2 steps, on 2 AMD Zen 3 cores: start-up 52-60 -> 26-35 s). A directory
  that JAX_COMPILATION_CACHE_DIR sets is left alone."""
  if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
