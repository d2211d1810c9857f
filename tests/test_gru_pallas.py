"""The fusion GRU's Pallas kernels for NVIDIA GPUs, checked without one: Pallas lowers them to
Triton for CUDA (`jax.export`), and Triton (its wheel, with its own ptxas) compiles that for
Hopper (sm_90: H100, H200) within a program's registers and shared memory at the sizes
`gru_pallas.fits`. Their arithmetic (interpreted) is checked in test_fusion.py."""
import contextlib
import io
import re
import subprocess
import pathlib

import jax
import jax.numpy as jnp
import pytest

from avemo_jax.models import gru_pallas

SHARED_BYTES = 227 * 1024  # the most shared memory one program (block) may use on sm_90
TRITON_CALL = "__gpu$xla.gpu.triton"


def _train(grus):
  """The forward kernel keeping the gates, then the backward kernel."""
  out = gru_pallas.forward(grus, True, False)
  return gru_pallas.backward([(h, h, kept, w) for (h, kept), (_, w) in zip(out, grus)], False)


def _grus(shapes):
  """Per (T, B, H): ((xr, xz, xn), (w_hr, w_hz, w_hn, b_hn)) as `gru_pallas.forward` takes them."""
  return [(tuple(jnp.zeros((t, b, h)) for _ in range(3)),
           (*(jnp.zeros((h, h)) for _ in range(3)), jnp.zeros(h))) for t, b, h in shapes]


def _export_for_cuda(grus, debug: bool = False):
  """The train function exported for CUDA, its Triton custom calls allowed; with `debug`, what
  Pallas prints while lowering (each kernel's Triton module) is returned too."""
  printed, pallas_call = io.StringIO(), gru_pallas.pl.pallas_call
  def call(*args, **kwargs):
    return pallas_call(*args, **kwargs, debug=debug)
  with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as patch:
    patch.setattr(gru_pallas.pl, "pallas_call", call)
    exported = jax.export.export(jax.jit(_train), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(grus)
  return exported, printed.getvalue()


def test_kernels_lower_to_triton_for_cuda():
  """Two GRU shapes (odd rows and units padded): a launch per shape and kernel."""
  exported, _ = _export_for_cuda(_grus([(7, 5, 6), (7, 17, 32), (7, 5, 6)]))
  assert exported.mlir_module().count(f"@{TRITON_CALL}") == 4


@pytest.mark.parametrize("units", [64, gru_pallas.MAX_UNITS])  # the configs' GRUs, the largest
def test_triton_compiles_the_kernels_for_hopper_without_spills(units, tmp_path):
  triton = pytest.importorskip("triton")
  from triton.backends import nvidia
  from triton.backends.compiler import GPUTarget

  _, printed = _export_for_cuda(_grus([(750, 64, units)] * 2), debug=True)
  modules = re.findall(r"^module @(\w+) \{.*?^\}", printed, flags=re.S | re.M)
  texts = re.findall(r"^module @\w+ \{.*?^\}", printed, flags=re.S | re.M)
  assert modules == ["forward_kernel", "backward_kernel"]
  tools = pathlib.Path(nvidia.__file__).parent / "bin"  # Triton >= 3.6 compiles sm_90 with the
  ptxas = next(p for p in (tools / "ptxas-blackwell", tools / "ptxas") if p.exists())  # first
  for name, text in zip(modules, texts):
    # Pallas prints locations in a form the parser does not read back; Triton needs none.
    text = re.sub(r' \[unknown\]| "[^"]*"\(#loc\d*\)', "", text)
    (tmp_path / f"{name}.ttir").write_text(text)
    kernel = triton.compile(str(tmp_path / f"{name}.ttir"), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": gru_pallas.num_warps(units), "num_stages": 1,
                                     "enable_fp_fusion": True})  # as XLA's Triton
    (tmp_path / f"{name}.ptx").write_text(kernel.asm["ptx"])
    report = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(tmp_path / f"{name}.ptx"), "-o",
                             str(tmp_path / f"{name}.cubin")], capture_output=True, text=True,
                            check=True).stderr
    assert " 0 bytes spill stores" in report, report
    assert kernel.metadata.shared <= SHARED_BYTES, (name, kernel.metadata.shared)
