"""Programs compiled by XLA for NVIDIA H200s without one (deviceless compilation, as for
ahead-of-time builds): the fusion GRU's Pallas kernels through XLA's own Triton, then CUDA's
ptxas; the face and fusion train steps in their GPU forms; every stage's train step for 8 GPUs.
Needs JAX's CUDA plugin (`pip install -e '.[cuda12,test]'`; no GPU or driver needed), else
skipped: CI does not install it (3 GB); test_gru_pallas.py compiles the kernels with Triton's
wheel there."""
import functools
import pathlib
import re
import subprocess

import jax
import pytest

pytest.importorskip("jax_plugins.xla_cuda12",
                    reason="JAX's CUDA plugin: pip install -e '.[cuda12]'")

from jax.experimental import topologies

import deviceless
from avemo_jax.models import fusion, gru_pallas
from test_gru_pallas import _grus, _train

# What XLA's GPU compiler reads of the device: an H200 SXM (sm_90, 132 SMs, 227 KB of shared
# memory a block), CUDA 12.9, cuDNN 9.
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 registers_per_core_limit: 65536
  registers_per_block_limit: 65536 cuda_compute_capability { major: 9 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H200"
"""


def _h200s(n: int) -> list:
  """n H200s of one machine, as XLA compiles for them."""
  return topologies.get_topology_desc(platform="cuda", target_config=H200,
                                      topology=f"1x1x{n}").devices


@functools.cache
def _on_h200() -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",), devices=_h200s(1)),
                                    jax.sharding.PartitionSpec())


def _abstract(tree):
  """`tree`'s shapes and dtypes, placed on the (deviceless) H200."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_on_h200()),
                      tree)


@pytest.mark.parametrize("units", [64, gru_pallas.MAX_UNITS])  # the configs' GRUs, the largest
def test_xla_compiles_the_gru_kernels_for_an_h200(units, tmp_path):
  """XLA refuses a kernel over the block's shared memory (RESOURCE_EXHAUSTED: checked at 256
  units, 800 KB) and its PTX assembles without spills."""
  grus = _abstract(_grus([(750, 64, units)] * 2))
  with deviceless.uncached():
    compiled = jax.jit(_train).lower(grus).compile({"xla_dump_to": str(tmp_path)})
  assert compiled.as_text().count('custom_call_target="__gpu$xla.gpu.triton"') == 2
  kernels = {name: path for path in tmp_path.glob("*.ptx")
             for name in re.findall(r"^\.visible \.entry (\w+_kernel)\(", path.read_text(), re.M)}
  assert sorted(kernels) == ["backward_kernel", "forward_kernel"]
  import nvidia.cuda_nvcc  # CUDA's ptxas, one of the plugin's requirements
  ptxas = pathlib.Path(nvidia.cuda_nvcc.__path__[0]) / "bin" / "ptxas"
  for name, path in kernels.items():
    report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", "/dev/null"],
                            capture_output=True, text=True, check=True).stderr
    assert " 0 bytes spill stores" in report, (name, report)


def test_face_train_step_compiles_for_an_h200_in_its_gpu_forms():
  """bfloat16: cuDNN's convolutions (both gradients), none of `layers`' CPU forms (their names
  are in the program's metadata) and no YNNPACK fusions."""
  text = deviceless.train_step(_h200s(1), "teacher")
  convolutions = re.findall(r"= \((\w+)\[.*custom_call_target=\"__cudnn\$(conv\w*)\"", text)
  assert {kind for _, kind in convolutions} == {"convForward", "convBackwardInput",
                                                "convBackwardFilter"}
  assert {dtype for dtype, _ in convolutions} == {"bf16"}, convolutions
  assert "_cpu_" not in text and "__ynn" not in text


@pytest.mark.parametrize("name", deviceless.STAGES)
def test_train_step_compiles_for_eight_h200s(name):
  """As `parallel.DataParallel` compiles it for one machine's 8 GPUs: the gradients summed over
  them (all-reduce), none of `layers`' CPU forms."""
  text = deviceless.train_step(_h200s(8), name)
  assert re.search(r" all-reduce-start\(", text) and "_cpu_" not in text  # asynchronous on GPUs


def test_fusion_train_step_runs_the_gru_kernels_on_an_h200(monkeypatch):
  """`gru_kernel="pallas"`: the fused model's two GRUs (one shape) in one launch each way, inside
  the real step (windows, loss, AdamW, the non-finite guard). `runs_kernel` answers as on one
  GPU: this process's devices are the CPU's."""
  monkeypatch.setattr(fusion, "runs_kernel", lambda kernel, units, *shape: (
      kernel == "pallas" and gru_pallas.fits(units, *shape)))
  text = deviceless.train_step(_h200s(1), "fusion", gru_kernel="pallas")
  assert text.count('custom_call_target="__gpu$xla.gpu.triton"') == 2
  assert " while(" not in text  # no scan left
