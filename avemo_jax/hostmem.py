"""Host memory: keep what malloc frees, so that XLA's CPU buffers are not page-faulted in anew on
every step; and Python's garbage collector paused while a big program is traced (`gc_paused`).

XLA's CPU runtime allocates each execution's buffers with malloc and frees them afterwards. glibc
returns blocks above its mmap threshold (32 MB at most) to the kernel on free and trims its heaps,
so the next step faults those pages in again and the kernel zero-fills them: the full face network's
forward pass at batch 32 faulted 706 MB per call and ran at 65 images/s; with freed memory kept
(no mmap'd blocks, no trimming), 0 MB and 98-104 images/s (2 EPYC cores, jax 0.10.2). jemalloc
with decay disabled does the same (109 images/s) but needs LD_PRELOAD; this needs nothing.

Each thread keeps glibc's own malloc arena: with one arena for all (`M_ARENA_MAX=1`, until
2026-12-01) XLA's compiler threads queued on its lock (face train step compiled in 29 s instead
of 20 on 2 Xeon cores; the fusion GRUs trained half as fast after the face stages). A thread
arena's heaps hold 64 MB at most and glibc serves a larger block of a non-main thread by mmap
whatever the settings, while XLA packs a program's temporaries into one allocation (the face
train step's: 1.2-1.6 GB, allocated by XLA's executor threads), faulted in anew every step:
~300,000 pages, a sixth of the step's CPU time. So training steps are compiled with their
temporaries split into heaps of at most 48 MB (`compile_step`: XLA's
`xla_multiheap_size_constraint_per_heap`), which a thread heap holds and keeps: ~0 faults a step,
the face train step 23.0 -> 26.4-26.5 images/s on 2 Xeon cores (README, *Speed*). The price: XLA
cannot store such an executable in JAX's persistent compilation cache, so a full-size training
step is compiled anew in each process (other programs, and steps whose temporaries fit one heap,
are cached as before): the face network's first step with a warm cache 12.8-14.3 -> ~28 s.
AVEMO_STEP_HEAP_MB=0 trades back (`compile_step`). A single buffer above 48 MB
still gets its own block (XLA then warns at compile time, "larger than the per-heap size
limit"); the layers keep theirs smaller (`models.layers`: the kernel gradients' columns in
chunks). The top pad keeps glibc from unmapping a thread heap that empties. The process keeps its
peak heap.

It applies only where XLA computes on the CPU (no GPU/TPU plugin installed, or JAX_PLATFORMS=cpu);
on an accelerator the buffers live in device memory. Set AVEMO_KEEP_FREED_MEMORY=0 to leave malloc
as it is, =1 to tune it on any platform.
"""
import contextlib
import ctypes
import gc
import logging
import os
import pkgutil
import sys
import threading
import warnings
from typing import Any

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_NEVER = -1  # as a trim threshold: SIZE_MAX
# glibc frees a thread arena's emptied heap (64 MB at most) unless the pad exceeds its size.
_TOP_PAD = 256 << 20
# A training step's temporaries in heaps a thread arena's 64 MB heap holds (module doc)
_HEAP_OPTION, _HEAP_BYTES = "xla_multiheap_size_constraint_per_heap", 48 << 20
_done = False
_gc_lock = threading.Lock()
_gc_pauses, _gc_was_enabled = 0, True


def _computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a backend (whose threads
  would allocate before the settings)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(m.name.startswith(("jax_cuda", "jax_rocm", "libtpu"))
                 for m in pkgutil.iter_modules())


def keep_freed_memory() -> bool:
  """Tunes glibc malloc to keep freed memory (call early, before the XLA backend starts its
  threads); True where it applied. A no-op elsewhere (not Linux/glibc, an accelerator) or when
  switched off (AVEMO_KEEP_FREED_MEMORY=0).
  AVEMO_MALLOC_ARENAS=N caps glibc's arenas at N (1: XLA's threads in the main arena too;
  compilation ~40% slower)."""
  global _done
  setting = os.environ.get("AVEMO_KEEP_FREED_MEMORY", "auto")
  arenas = os.environ.get("AVEMO_MALLOC_ARENAS", "")
  if arenas and not (arenas.isdigit() and int(arenas) > 0):
    raise ValueError(f"AVEMO_MALLOC_ARENAS={arenas!r}: set a positive number of malloc arenas "
                     "(1: one for all threads), or leave it unset for glibc's per-thread arenas")
  if _done or setting == "0" or (setting != "1" and not _computes_on_cpu()):
    return _done
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl or another libc: nothing to tune
    return False
  # mallopt takes an int, and glibc stores the trim threshold as a size_t: -1 is "never". The
  # largest positive int (2 GiB) was not enough: the face train step frees more than that at
  # once, and glibc then returned it, 100,000-300,000 pages re-faulted every step.
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER), (_M_TOP_PAD, _TOP_PAD))
  settings += ((_M_ARENA_MAX, int(arenas)),) if arenas else ()
  _done = all(mallopt(key, value) == 1 for key, value in settings)
  if not _done:
    logging.warning("hostmem: glibc refused a mallopt setting; XLA buffers may be re-faulted")
  return _done


def compile_step(lowered: Any) -> Any:
  """`lowered.compile()` for a training step (a `jax.stages.Lowered`): where freed memory is
  kept for XLA on the CPU, with its temporaries in heaps of at most AVEMO_STEP_HEAP_MB (48 MB
  unless set; module doc). JAX's warning that its persistent cache cannot store such an
  executable is left out. AVEMO_STEP_HEAP_MB=0: one allocation, as XLA makes it (a cached step,
  re-faulted temporaries)."""
  import jax  # pylint: disable=import-outside-toplevel  # not before keep_freed_memory
  setting = os.environ.get("AVEMO_STEP_HEAP_MB", str(_HEAP_BYTES >> 20))
  if not (setting.isdigit() and int(setting) < 2048):
    raise ValueError(f"AVEMO_STEP_HEAP_MB={setting!r}: set the largest heap of a training step's "
                     "temporaries in MB (below 64 keeps them in a thread's malloc heap; 0: one "
                     "allocation, cacheable), or leave it unset for 48")
  if not (_done and int(setting) and jax.default_backend() == "cpu"):
    return lowered.compile()
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Error writing persistent compilation cache entry.*"
                            "Multiple temp buffer allocations")
    return lowered.compile(compiler_options={_HEAP_OPTION: int(setting) << 20})


@contextlib.contextmanager
def gc_paused():
  """Python's cyclic garbage collector off inside (nested and threaded uses included), as it was
  after. Tracing a big model keeps hundreds of thousands of objects alive (the face train step:
  ~320,000), and every full collection scans them all again: 1.1 of the 3.9 s its tracing and
  lowering took on 2 EPYC cores, 0.3 of the 3.2 s of initialising the network."""
  global _gc_pauses, _gc_was_enabled
  with _gc_lock:
    if _gc_pauses == 0:
      _gc_was_enabled = gc.isenabled()
      gc.disable()
    _gc_pauses += 1
  try:
    yield
  finally:
    with _gc_lock:
      _gc_pauses -= 1
      if _gc_pauses == 0 and _gc_was_enabled:
        gc.enable()
