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


XEON, ZEN3, ZEN5, ARM = ("GenuineIntel", 6), ("AuthenticAMD", 25), ("AuthenticAMD", 26), ("", 0)


@pytest.mark.parametrize("choice,cpu,want", [
    ("auto", XEON, "eigen"), ("auto", ZEN3, "eigen"), ("auto", ZEN5, "ynnpack"),
    ("auto", ARM, "ynnpack"), ("eigen", ZEN5, "eigen"), ("ynnpack", XEON, "ynnpack"),
    (None, XEON, "eigen"), ("", ZEN3, "eigen"), (None, ZEN5, "ynnpack")])
def test_configure_appends_the_flag_for_the_choice(choice, cpu, want, monkeypatch):
  monkeypatch.setattr(xla_cpu, "_cpu", lambda: cpu)
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
  monkeypatch.setattr(xla_cpu, "_cpu", lambda: XEON)
  monkeypatch.setattr(hostmem, "computes_on_cpu", lambda: True)
  own = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_REDUCE"
  monkeypatch.setenv("XLA_FLAGS", own)
  assert xla_cpu.configure() == "ynnpack" and os.environ["XLA_FLAGS"] == own
  monkeypatch.setattr(hostmem, "computes_on_cpu", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert xla_cpu.configure() == "ynnpack" and os.environ["XLA_FLAGS"] == ""


def test_cpu_reads_the_first_processor_of_cpuinfo(tmp_path, monkeypatch):
  """Vendor and family of processor 0, as Linux writes /proc/cpuinfo; nothing where it is
  missing or says neither (ARM's lists "CPU implementer" instead)."""
  info = tmp_path / "cpuinfo"
  entry = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: 1\n"
  info.write_text(entry.format(0, 25) + "\n" + entry.format(1, 26))
  real = xla_cpu.pathlib.Path
  monkeypatch.setattr(xla_cpu.pathlib, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
  assert xla_cpu._cpu() == ("AuthenticAMD", 25)
  info.write_text("processor\t: 0\nCPU implementer\t: 0x41\nCPU architecture: 8\n")
  assert xla_cpu._cpu() == ("", 0)
  info.unlink()
  assert xla_cpu._cpu() == ("", 0)


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
