"""Host memory: keep what malloc frees, so that XLA's CPU buffers are not page-faulted in anew on
every step.

XLA's CPU runtime allocates each execution's buffers with malloc and frees them afterwards. glibc
returns blocks above its mmap threshold (32 MB at most) to the kernel on free and trims its heaps,
so the next step faults those pages in again and the kernel zero-fills them: the full face network's
forward pass at batch 32 faulted 706 MB per call and ran at 65 images/s; with freed memory kept
(no mmap'd blocks, no trimming, one arena), 0 MB and 98-104 images/s (2 EPYC cores, jax 0.10.2).
jemalloc with decay disabled does the same (109 images/s) but needs LD_PRELOAD; this needs nothing.
The cost: the process keeps its peak heap instead of returning it. Set AVEMO_KEEP_FREED_MEMORY=0
to leave malloc as it is.
"""
import ctypes
import logging
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_done = False


def keep_freed_memory() -> bool:
  """Tunes glibc malloc to keep freed memory (call early, before the XLA backend starts its
  threads); True where it applied. A no-op elsewhere (not Linux/glibc) or when switched off."""
  global _done
  if _done or os.environ.get("AVEMO_KEEP_FREED_MEMORY", "1") == "0":
    return _done
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl or another libc: nothing to tune
    return False
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
  _done = all(mallopt(key, value) == 1 for key, value in settings)
  if not _done:
    logging.warning("hostmem: glibc refused a mallopt setting; XLA buffers may be re-faulted")
  return _done
