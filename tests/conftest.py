"""8 fake CPU devices, a persistent compilation cache and the CPU settings of `avemo_jax.main`,
set before JAX starts."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path.home() / ".cache" / "avemo_jax_tests_xla"))

from avemo_jax import xla_cpu  # noqa: E402

xla_cpu.prepare()  # as avemo_jax.main: no re-faulted CPU buffers, XLA's fastest convolutions
import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
flags.FLAGS.mark_as_parsed()  # Grain and absl logging read flags outside app.run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(config, workdir, summary) of one `fusion.py:tiny` run, 4 steps a stage, for the export and
  prediction tests (the numbers need not be good, only reproduced). Their modules share the xdist
  group "tiny_run" (pyproject: --dist loadgroup), so the suite trains it once."""
  from avemo_jax.train import stages
  from configs import fusion
  config = fusion.get_config("tiny")
  for stage in (config.teacher, config.student, config.audio.train, config.fusion.train):
    stage.num_steps = 4
  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  return config, workdir, stages.run(config, workdir)
