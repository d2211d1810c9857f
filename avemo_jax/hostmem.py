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
of 20 on 2 Xeon cores; the fusion GRUs trained half as fast after the face stages). But a thread
arena's heaps hold 64 MB at most, and glibc serves a larger block of a non-main thread by mmap
whatever the settings, while XLA packs a program's temporaries into one allocation (the face
train step's: 1.2-1.6 GB). Dispatched asynchronously, a program runs, and allocates, in one of
XLA's executor threads: that block was faulted in anew every step, ~300,000 pages, a sixth of
the step's CPU time. So XLA runs each single-device CPU program inline in the thread that calls
it (`jax_cpu_enable_async_dispatch` off; its operations still use XLA's intra-op threads), and
the loop's calls come from the main thread, whose arena grows without that limit and keeps what
is freed: ~0 faults a step, the face train step 23.0 -> 24.2-24.9 images/s on 2 Xeon cores
(README, *Speed in detail*). Python waits for each call to finish instead of queueing the next;
the loop's prefetch thread (`train.loop`) reads the batches while a step runs and, on the CPU,
leaves them on the host for the step's call to copy (`parallel.DataParallel.batch`): placing them
from Python held the GIL that the calling thread needs between steps, 0.3-0.5 ms of a fusion
GRU's 4 ms step.
For a few hours of 2026-12-01 the temporaries were split into heaps of 48 MB instead: as fast,
but XLA cannot store such an executable in the persistent compilation cache, so every process
compiled its steps anew (the first face step 27.8 s instead of 14). The top pad keeps glibc from
unmapping a thread heap that empties (XLA's intra-op threads allocate too). The process keeps
its peak heap.

It applies only where XLA computes on the CPU (no GPU/TPU plugin installed, or JAX_PLATFORMS=cpu);
on an accelerator the buffers live in device memory. Set AVEMO_KEEP_FREED_MEMORY=0 to leave malloc
and JAX's dispatch as they are, =1 to tune them on any platform.
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
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_NEVER = -1  # as a trim threshold: SIZE_MAX
# glibc frees a thread arena's emptied heap (64 MB at most) unless the pad exceeds its size.
_TOP_PAD = 256 << 20
_done = False
_gc_lock = threading.Lock()
_gc_pauses, _gc_was_enabled = 0, True


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, decided without starting a backend (whose threads
  would allocate before the settings)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(m.name.startswith(("jax_cuda", "jax_rocm", "libtpu"))
                 for m in pkgutil.iter_modules())


def keep_freed_memory() -> bool:
  """Tunes glibc malloc to keep freed memory and has XLA run CPU programs in the calling thread
  (call early, before the XLA backend starts); True where it applied. A no-op elsewhere (not
  Linux/glibc, an accelerator) or when switched off (AVEMO_KEEP_FREED_MEMORY=0).
  AVEMO_MALLOC_ARENAS=N caps glibc's arenas at N (1: XLA's threads in the main arena too;
  compilation ~40% slower)."""
  global _done
  setting = os.environ.get("AVEMO_KEEP_FREED_MEMORY", "auto")
  arenas = os.environ.get("AVEMO_MALLOC_ARENAS", "")
  if arenas and not (arenas.isdigit() and int(arenas) > 0):
    raise ValueError(f"AVEMO_MALLOC_ARENAS={arenas!r}: set a positive number of malloc arenas "
                     "(1: one for all threads), or leave it unset for glibc's per-thread arenas")
  if _done or setting == "0" or (setting != "1" and not computes_on_cpu()):
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
    return False
  import jax  # pylint: disable=import-outside-toplevel  # after the settings (module doc)
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # read when the CPU client starts
  return True


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
