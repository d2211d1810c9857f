"""Every stage's train step compiled by XLA for a TPU v5e slice of 8 chips without one (deviceless
compilation, as MaxText's train_compile does), as `parallel.DataParallel` compiles it for
training. Needs libtpu (`pip install 'jax[tpu]'`; no TPU needed), else skipped: CI does not
install it."""
import pytest

pytest.importorskip("libtpu", reason="libtpu: pip install 'jax[tpu]'")

from jax.experimental import topologies

import deviceless

pytestmark = pytest.mark.xdist_group("libtpu")  # one process a machine may load it (its lockfile)


@pytest.mark.parametrize("name", deviceless.STAGES)
def test_train_step_compiles_for_a_tpu_v5e_slice(name):
  """The gradients summed over the 8 chips (all-reduce), none of `layers`' CPU forms (their names
  are in the program's metadata)."""
  topology = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu")
  text = deviceless.train_step(topology.devices, name)
  assert "num_partitions=8" in text and " all-reduce(" in text and "_cpu_" not in text
