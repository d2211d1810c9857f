"""8 fake CPU devices and a persistent compilation cache, set before JAX starts."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path.home() / ".cache" / "avemo_jax_tests_xla"))

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
flags.FLAGS.mark_as_parsed()  # Grain and absl logging read flags outside app.run
