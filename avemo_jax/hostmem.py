"""Host memory: keep what malloc frees, so that XLA's CPU buffers are not page-faulted in anew on
every step; and Python's garbage collector paused while a big program is traced (`gc_paused`).

XLA's CPU runtime allocates each execution's buffers with malloc and frees them afterwards. glibc
returns blocks above its mmap threshold (32 MB at most) to the kernel on free and trims its heaps,
so the next step faults those pages in again and the kernel zero-fills them: the full face network's
forward pass at batch 32 faulted 706 MB per call and ran at 65 images/s; with freed memory kept
(no mmap'd blocks, no trimming, one arena), 0 MB and 98-104 images/s (2 EPYC cores, jax 0.10.2).
jemalloc with decay disabled does the same (109 images/s) but needs LD_PRELOAD; this needs nothing.
The costs: the process keeps its peak heap instead of returning it, and one malloc arena for all
threads slows allocation-heavy threads (Grain's synthetic faces: 307 -> 128 images/s per core,
still ~5x the face train step's need; compilation: first step 36.8 -> 49.2 s cold). So it applies
only where XLA computes on the CPU (no GPU/TPU plugin installed, or JAX_PLATFORMS=cpu); on an
accelerator the buffers live in device memory. Set AVEMO_KEEP_FREED_MEMORY=0 to leave malloc as it
is, =1 to tune it on any platform.
"""
import contextlib
import ctypes
import gc
import logging
import os
import pkgutil
import sys
import threading

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER = -1  # as a trim threshold: SIZE_MAX
_done = False
_gc_lock = threading.Lock()
_gc_pauses, _gc_was_enabled = 0, True


def _computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a backend (which would
  start the threads whose arenas the setting must precede)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(m.name.startswith(("jax_cuda", "jax_rocm", "libtpu"))
                 for m in pkgutil.iter_modules())


def keep_freed_memory() -> bool:
  """Tunes glibc malloc to keep freed memory (call early, before the XLA backend starts its
  threads); True where it applied. A no-op elsewhere (not Linux/glibc, an accelerator) or when
  switched off (AVEMO_KEEP_FREED_MEMORY=0)."""
  global _done
  setting = os.environ.get("AVEMO_KEEP_FREED_MEMORY", "auto")
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
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER), (_M_ARENA_MAX, 1))
  _done = all(mallopt(key, value) == 1 for key, value in settings)
  if not _done:
    logging.warning("hostmem: glibc refused a mallopt setting; XLA buffers may be re-faulted")
  return _done


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
