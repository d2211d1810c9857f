"""Which library computes XLA's convolutions on the CPU, chosen before its backend starts.

jax 0.10.2's XLA hands kxk convolutions to YNNPACK (`__ynn_fusion` in the compiled HLO). On 2 Intel
Xeon cores (KVM, AVX-512) YNNPACK ran them at about half PyTorch/oneDNN's speed (batch 32, 33x33x80
-> 192: 60 ms forward against 31; 67x67x32 -> 64: 43 against 23, on one core) where XLA's own
convolutions (Eigen's) ran the forward as fast as torch (31 and 23 ms) and the two gradients in
0.9-1.5x its time (94 against 73, 71 against 55 ms): the face train step 0.89 -> 1.03-1.05 of
torch's speed, face inference 0.97 -> 1.28-1.29 (README, *Speed in detail*). On 2 AMD EPYC (Zen 5)
cores YNNPACK's ran twice as fast as on the Xeon and Eigen's were no faster per core: the face
train step fell 9% without YNNPACK's (measured with the convolution forms of `models.layers` for
YNNPACK). On 2 AMD EPYC Zen 3 cores (AVX2, no AVX-512) Eigen's won again: face train 8.4 -> 11.3
images/s (torch's 8.9 and 10.3 beside them), inference 27.6 -> 50.7, VGGish train 12.6-13.2 ->
17.4-19.4 examples/s, the first face step 63-77 -> 58-62 s cold (README, *On 2 AMD EPYC Zen 3
cores*).
So "auto" (the default) keeps XLA's default (YNNPACK) on the CPUs where it was measured faster,
AMD family 26 (Zen 5) and later, and routes the convolutions to Eigen on every other x86 CPU;
elsewhere (ARM: not measured) XLA's default stays. AVEMO_CPU_CONVOLUTIONS=eigen or =ynnpack
chooses, and the user's own --xla_cpu_experimental_ynn_fusion_type in XLA_FLAGS is left alone.
`models.layers` reads the choice back from XLA_FLAGS (`convolutions`): XLA's plain convolutions
with Eigen, its own forms of the kxk ones (padded, im2col products) with YNNPACK.
"""
import os
import pathlib

from avemo_jax import hostmem

ENV = "AVEMO_CPU_CONVOLUTIONS"
CHOICES = ("auto", "eigen", "ynnpack")
_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_CONVOLUTION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def cpuinfo() -> dict[str, str]:
  """The fields of the first processor in /proc/cpuinfo ("vendor_id", "cpu family", "model
  name", ...); empty where there is none (not Linux)."""
  info = pathlib.Path("/proc/cpuinfo")
  fields = {}
  for line in info.read_text().splitlines() if info.exists() else []:
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  return fields


def _cpu() -> tuple[str, int]:
  """(vendor_id, cpu family) of this CPU; ("", 0) where cpuinfo says neither (not x86)."""
  fields = cpuinfo()
  family = fields.get("cpu family", "")
  return fields.get("vendor_id", ""), int(family) if family.isdigit() else 0


def _eigen_faster() -> bool:
  """Whether Eigen's convolutions are the faster ones on this CPU (module docstring): x86 but
  not AMD's Zen 5 or later."""
  vendor, family = _cpu()
  return vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family < 26)


def prepare() -> None:
  """The CPU settings of every entry point (`avemo_jax.main`, the tools, the benchmark's fresh
  processes, the tests), applied before XLA starts: malloc keeps what it frees and XLA runs CPU
  programs inline (`hostmem.keep_freed_memory`), and XLA computes the convolutions with the
  faster library on this CPU (`configure`)."""
  hostmem.keep_freed_memory()
  configure()


def configure() -> str:
  """Sets XLA_FLAGS for the chosen convolutions (call before the XLA backend starts, as
  `hostmem.keep_freed_memory`); returns what XLA will use, "eigen" or "ynnpack". A no-op where
  XLA does not compute on the CPU."""
  choice = os.environ.get(ENV) or "auto"
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r}: set one of {', '.join(CHOICES)} (auto: YNNPACK's "
                     "convolutions on AMD Zen 5 and later and on non-x86 CPUs, Eigen's on other "
                     "x86 CPUs), or leave it unset")
  flags = os.environ.get("XLA_FLAGS", "")
  if _FLAG in flags or not hostmem.computes_on_cpu():
    return convolutions()
  if choice == "eigen" or (choice == "auto" and _eigen_faster()):
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}=-{_CONVOLUTION}".strip()
  return convolutions()


def convolutions() -> str:
  """"eigen" when XLA_FLAGS take convolutions from YNNPACK (the flag's last value removes them,
  or lists fusion types without them), else "ynnpack", XLA's default."""
  values = [f.split("=", 1)[1] for f in os.environ.get("XLA_FLAGS", "").split()
            if f.startswith(_FLAG + "=")]
  if not values:
    return "ynnpack"
  types = [t.strip() for t in values[-1].split(",") if t.strip()]
  if f"-{_CONVOLUTION}" in types:
    return "eigen"
  relative = types and all(t[0] in "+-" for t in types)
  return "ynnpack" if relative or _CONVOLUTION in types else "eigen"
