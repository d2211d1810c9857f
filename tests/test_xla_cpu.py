"""`xla_cpu`: which library XLA's CPU convolutions use, set in XLA_FLAGS and read back."""
import os
import subprocess
import sys

import pytest

from avemo_jax import hostmem, xla_cpu

NO_YNN_CONVS = ("--xla_cpu_experimental_ynn_fusion_type="
                "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")


@pytest.mark.parametrize("flags,want", [
    ("", "ynnpack"),
    ("--xla_force_host_platform_device_count=8", "ynnpack"),
    (NO_YNN_CONVS, "eigen"),
    ("--xla_cpu_experimental_ynn_fusion_type=", "eigen"),  # YNNPACK off altogether
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT", "eigen"),
    ("--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE", "ynnpack"),
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,"
     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION", "ynnpack"),
    (f"{NO_YNN_CONVS} --xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE",
     "ynnpack"),  # the last one counts, as in XLA
])
def test_convolutions_read_back_from_xla_flags(flags, want, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert xla_cpu.convolutions() == want


@pytest.mark.parametrize("choice,intel,want", [
    ("auto", True, "eigen"), ("auto", False, "ynnpack"), ("eigen", False, "eigen"),
    ("ynnpack", True, "ynnpack"), (None, True, "eigen"), ("", True, "eigen")])
def test_configure_appends_the_flag_for_the_choice(choice, intel, want, monkeypatch):
  monkeypatch.setattr(xla_cpu, "_intel", lambda: intel)
  monkeypatch.setattr(hostmem, "computes_on_cpu", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  if choice is None:
    monkeypatch.delenv(xla_cpu.ENV, raising=False)
  else:
    monkeypatch.setenv(xla_cpu.ENV, choice)
  assert xla_cpu.configure() == want == xla_cpu.convolutions()
  assert os.environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8")
  assert xla_cpu.configure() == want  # twice: the flag once
  assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == (want == "eigen")


def test_configure_leaves_the_users_flag_and_accelerators_alone(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_intel", lambda: True)
  monkeypatch.setattr(hostmem, "computes_on_cpu", lambda: True)
  own = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"
  monkeypatch.setenv("XLA_FLAGS", own)
  assert xla_cpu.configure() == "ynnpack" and os.environ["XLA_FLAGS"] == own
  monkeypatch.setattr(hostmem, "computes_on_cpu", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert xla_cpu.configure() == "ynnpack" and os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("value", ["Eigen", "onednn"])
def test_configure_names_a_bad_choice(value, monkeypatch):
  monkeypatch.setenv(xla_cpu.ENV, value)
  with pytest.raises(ValueError, match=f"AVEMO_CPU_CONVOLUTIONS='{value}'.*auto, eigen, ynnpack"):
    xla_cpu.configure()


COMPILED = """
import jax, jax.numpy as jnp
from avemo_jax import xla_cpu
print(xla_cpu.configure())
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print("ynn" if "__ynn_fusion" in f.lower(jnp.ones((2, 17, 17, 32)), jnp.ones((3, 3, 32, 32))).compile(
    ).as_text() else "xla")
"""


@pytest.mark.parametrize("choice", ["eigen", "ynnpack"])
def test_xla_compiles_convolutions_as_configured(choice):
  """A fresh process (XLA reads its flags once): the flag still means what it did in jax 0.10.2."""
  env = {**os.environ, xla_cpu.ENV: choice, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", COMPILED], capture_output=True, text=True,
                        env=env, check=True)
  assert done.stdout.split() == [choice, {"eigen": "xla", "ynnpack": "ynn"}[choice]]
