"""The CPU forms of convolution and max pooling (`models.layers`) against Flax's own layers,
forward and gradients, over the kernel shapes, strides and paddings the networks use; and
`hostmem`, which keeps XLA's freed buffers and pauses the garbage collector while tracing."""
import gc
import os
import subprocess
import sys
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avemo_jax import hostmem
from avemo_jax.models import layers

CONVS = [((3, 3), 1, "SAME"), ((3, 3), 1, "VALID"), ((3, 3), 1, ((0, 2), (1, 0))),
         ((3, 3), 2, "VALID"), ((3, 3), 2, ((1, 1), (1, 1))),
         ((1, 7), 1, ((0, 0), (3, 3))), ((7, 1), 1, ((3, 3), (0, 0))), ((1, 1), 1, "SAME"),
         ((1, 1), 2, "VALID"), ((3, 1), 1, ((1, 1), (0, 0)))]


@pytest.fixture(params=["ynnpack", "eigen"])
def convolutions(request, monkeypatch):
  """Both CPU forms of the kxk convolutions whatever XLA_FLAGS say: ours for YNNPACK's, XLA's
  plain ones for Eigen's (`xla_cpu.convolutions`)."""
  monkeypatch.setattr(layers.xla_cpu, "convolutions", lambda: request.param)
  return request.param


@pytest.mark.parametrize("batch", [1, 2])  # the weight gradient's two forms (_batch_product)
@pytest.mark.parametrize("kernel,stride,padding", CONVS)
def test_conv_equals_flax_conv(kernel, stride, padding, batch, convolutions):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 11, 12, 5)), jnp.float32)
  ours = layers.Conv(6, kernel, strides=stride, padding=padding)
  flax_conv = nn.Conv(6, kernel, strides=stride, padding=padding)
  variables = flax_conv.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)
  loss = lambda module: lambda v, x: (module.apply(v, x) ** 2).sum()
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x), flax_conv.apply(variables, x),
                             atol=1e-5, rtol=1e-5)
  ours_grad = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  flax_grad = jax.grad(loss(flax_conv), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               ours_grad, flax_grad)
  jaxpr = lambda: str(jax.make_jaxpr(ours.apply)(variables, x))
  ours_on_cpu = kernel == (1, 1) and stride == 1 or convolutions == "ynnpack"
  with layers.every_platform():  # both forms, as avemo_jax.export lowers for several platforms
    assert ("platform_index" in jaxpr()) == ours_on_cpu
  # Otherwise the form of this backend (CPU) alone, chosen while tracing.
  assert "platform_index" not in jaxpr() and ("custom_vjp" in jaxpr()) == ours_on_cpu
  with layers.portable():  # plain convolutions only, as the ONNX converter traces them
    assert "platform_index" not in jaxpr() and "custom_vjp" not in jaxpr()


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, "SAME"), ((3, 3), 2, "VALID")])
def test_bfloat16_conv_trains_on_both_cpu_forms(kernel, stride, padding, convolutions):
  """config.dtype="bfloat16" on a CPU: bf16 products accumulated in float32 (XLA's CPU dot has no
  bf16 x bf16 -> f32 form); values and gradients are float32 Flax's to bf16 precision."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 12, 5)), jnp.float32)
  ours = layers.Conv(6, kernel, strides=stride, padding=padding, dtype=jnp.bfloat16)
  flax_conv = nn.Conv(6, kernel, strides=stride, padding=padding)
  variables = flax_conv.init(jax.random.key(1), x)
  loss = lambda module: lambda v, x: (module.apply(v, x).astype(jnp.float32) ** 2).sum()
  ours_grad = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  flax_grad = jax.grad(loss(flax_conv), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.03 * np.abs(b).max()),
               ours_grad, flax_grad)


@pytest.mark.parametrize("images_per_chunk", [1, 2, 4])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), 1, "SAME"), ((3, 3), 2, "VALID")])
def test_kernel_gradient_in_chunks_of_the_batch(kernel, stride, padding, images_per_chunk,
                                                monkeypatch):
  """The kernel gradient summed over chunks of the batch equals Flax's, on one device and with
  the batch sharded over 8 (the chunks interleave images, so each device keeps its own)."""
  monkeypatch.setattr(layers.xla_cpu, "convolutions", lambda: "ynnpack")  # ours: XLA's default
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 11, 12, 5)), jnp.float32)
  ours, flax_conv = (conv(6, kernel, strides=stride, padding=padding)
                     for conv in (layers.Conv, nn.Conv))
  variables = flax_conv.init(jax.random.key(1), x)
  _, out_h, out_w, _ = flax_conv.apply(variables, x).shape
  monkeypatch.setattr(layers, "_CHUNK_BYTES", images_per_chunk * out_h * out_w * 9 * 5 * 4)
  loss = lambda module: lambda v, x: (module.apply(v, x) ** 2).sum()
  want = jax.grad(loss(flax_conv))(variables, x)
  grad = jax.jit(jax.grad(loss(ours)))
  assert "stablehlo.while" in grad.lower(variables, x).as_text()  # 8 / images_per_chunk chunks
  sharded = jax.device_put(x, jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices()[:8], ("batch",)), jax.sharding.PartitionSpec("batch")))
  for got in (grad(variables, x), grad(variables, sharded)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got, want)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_dimension_numbers_in_any_form_lax_takes(kernel, monkeypatch):
  """Channels-last said as strings or as `ConvDimensionNumbers` takes the same (CPU) form."""
  monkeypatch.setattr(layers.xla_cpu, "convolutions", lambda: "ynnpack")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 10, 5)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(*kernel, 5, 6)), jnp.float32)
  names = ("NHWC", "HWIO", "NHWC")
  conv = lambda numbers: lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "VALID",
                                                                   dimension_numbers=numbers)
  want = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=names)
  for numbers in (names, jax.lax.conv_dimension_numbers(x.shape, w.shape, names)):
    assert "custom_vjp" in str(jax.make_jaxpr(conv(numbers))(x, w))
    np.testing.assert_allclose(conv(numbers)(x, w), want, atol=1e-5, rtol=1e-5)


def test_forms_chosen_by_the_backend_unless_lowered_for_every_platform():
  """Traced for this process's backend, only its form is in the program; under `every_platform`
  (avemo_jax.export) a program lowered for CPU and CUDA carries both, switched per platform."""
  x = jax.ShapeDtypeStruct((2, 15, 16, 4), jnp.float32)
  pool = jax.jit(lambda x: layers.max_pool(x, (3, 3), (2, 2)))
  module = lambda: jax.export.export(pool, platforms=("cpu", "cuda"))(x).mlir_module()
  assert "reduce_window" not in module()  # CPU's strided slices alone
  with layers.every_platform():
    assert "reduce_window" in module()  # and the reduce-window GPUs run


@pytest.mark.parametrize("window,strides,shape", [((3, 3), (2, 2), (2, 15, 16, 4)),
                                                  ((2, 2), (2, 2), (2, 12, 8, 3))])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_flax_max_pool(window, strides, shape, ties):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  if ties:  # a ReLU's zeros and rounded values: several window positions hold the maximum
    x = jnp.round(jnp.maximum(x, 0.0))
  want = nn.max_pool(x, window, strides=strides, padding="VALID")
  np.testing.assert_array_equal(jax.jit(layers.max_pool, static_argnums=(1, 2))(x, window,
                                                                              strides), want)
  with layers.portable():
    np.testing.assert_array_equal(layers.max_pool(x, window, strides), want)
  # The same gradients, ties going to the first maximal position as select-and-scatter's.
  r = jax.random.normal(jax.random.key(0), want.shape)
  grad = lambda f: jax.jit(jax.grad(lambda x: (f(x) * r).sum()))(x)
  ours = grad(lambda x: layers.max_pool(x, window, strides))
  np.testing.assert_allclose(ours, grad(lambda x: nn.max_pool(x, window, strides=strides)),
                             atol=1e-6)
  assert not ties or int((x == 0).sum()) > x.size // 4


def _last_word(script: str, **env: str) -> str:
  """The last word `script` prints in a fresh Python process (malloc settings are per process)."""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env={**os.environ, **env}, check=True)
  return done.stdout.split()[-1]


FAULTS = """
import resource, jax, jax.numpy as jnp
from avemo_jax import hostmem
hostmem.keep_freed_memory()  # a no-op under AVEMO_KEEP_FREED_MEMORY=0
x, w = jnp.ones((16, 69, 69, 32)), jnp.ones((3, 3, 32, 32))
f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())
jax.block_until_ready(f(x, w))
rounds = []  # the quietest of 3 rounds: a one-off fault burst elsewhere in the process is not it
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    jax.block_until_ready(f(x, w))
  rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(min(rounds))
"""


@pytest.mark.parametrize("keep", ["0", "1"])
def test_hostmem_keeps_freed_memory(keep):
  """XLA's buffers of a convolution are page-faulted in anew each call unless freed memory is
  kept (fresh processes: malloc settings are per process)."""
  # glibc's mmap threshold adapts to the blocks it has freed, so whether the control faults
  # depends on the allocation history; pinned at 1 MiB it always does, and hostmem must win.
  faults_per_call = float(_last_word(FAULTS, AVEMO_KEEP_FREED_MEMORY=keep, XLA_FLAGS="",
                                     GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576"))
  if keep == "1":
    assert faults_per_call < 16, faults_per_call
  else:
    assert faults_per_call > 256, faults_per_call  # (if this fails, the check above means little)


INLINE = """
import os, resource
from avemo_jax import hostmem
assert hostmem.keep_freed_memory()
import jax, jax.numpy as jnp
if os.environ["DISPATCH"] == "async":  # the control: XLA's default, before its client starts
  jax.config.update("jax_cpu_enable_async_dispatch", True)
x = jnp.ones((16, 64, 64, 32))  # 8 MB
def f(x):  # twelve 8 MB intermediates alive together: 96-192 MB of temporaries
  ys = [jnp.sin(x * i) for i in range(12)]
  return sum(jnp.cos(y).sum() * jnp.tanh(y).sum() for y in ys)
f = jax.jit(f).lower(x).compile()
temp_pages = f.memory_analysis().temp_size_in_bytes // 4096
assert temp_pages > 64 << 8, temp_pages  # above a thread heap's 64 MB
jax.block_until_ready(f(x))
rounds = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    jax.block_until_ready(f(x))
  rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
print(min(rounds) / temp_pages)
"""


@pytest.mark.parametrize("dispatch", ["inline", "async"])
def test_hostmem_keeps_a_programs_temporaries_above_a_thread_heap(dispatch):
  """XLA allocates a program's temporaries as one block (the face train step's: 1.2-1.6 GB),
  which glibc serves by mmap, faulted in anew every call, when the program runs in one of XLA's
  threads (asynchronous dispatch): 302,000 page faults a face step. keep_freed_memory has XLA
  run it in the calling thread, whose main arena keeps the block. An arena per thread: glibc's
  default cap (8 per core) makes threads beyond it share arenas, the main one too, so whether
  XLA's thread faults would be chance (without it the control did not fault in 1 of 2 CI runs)."""
  faulted = float(_last_word(INLINE, AVEMO_KEEP_FREED_MEMORY="1", AVEMO_MALLOC_ARENAS="256",
                             DISPATCH=dispatch))
  if dispatch == "inline":
    assert faulted < 0.05, faulted  # of the temporaries' pages, per call
  else:
    assert faulted > 0.5, faulted  # (if this fails, the check above means little)


TRIM = """
import ctypes
from avemo_jax import hostmem
assert hostmem.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
libc.sbrk.argtypes = [ctypes.c_ssize_t]
block = libc.malloc(5 << 29)  # 2.5 GiB of address space, never touched
end = libc.sbrk(0)
libc.free(block)
print(end - libc.sbrk(0))  # bytes glibc gave back to the kernel
"""


def test_hostmem_keeps_more_than_2_gib_freed_at_once():
  """The face train step frees more than 2 GiB at once (the largest threshold an int can state):
  glibc must keep that too, or every step faults it in again."""
  assert int(_last_word(TRIM, AVEMO_KEEP_FREED_MEMORY="1")) == 0


THREAD = """
import ctypes, resource, threading
from avemo_jax import hostmem
assert hostmem.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
def work():  # in a thread's own arena: 40 MB held fills its first heap, 48 MB needs a second
  held = libc.malloc(40 << 20)
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(48 << 20)
    libc.memset(block, 1, 48 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(max(faults[1:]))
"""


@pytest.mark.parametrize("arenas", ["", "1"])
def test_hostmem_keeps_what_a_thread_frees(arenas):
  """XLA's threads allocate in their own arenas; glibc unmaps a thread heap that empties unless
  the top pad exceeds its size, and 48 MB would then be faulted in again (12,288 pages). With
  one arena (AVEMO_MALLOC_ARENAS=1) the thread allocates in the main one, never trimmed."""
  assert int(_last_word(THREAD, AVEMO_KEEP_FREED_MEMORY="1", AVEMO_MALLOC_ARENAS=arenas)) < 100


@pytest.mark.parametrize("value", ["0", "one", "-2"])
def test_hostmem_names_a_bad_arena_count(value, monkeypatch):
  monkeypatch.setenv("AVEMO_MALLOC_ARENAS", value)
  with pytest.raises(ValueError, match=f"AVEMO_MALLOC_ARENAS='{value}'.*positive number"):
    hostmem.keep_freed_memory()


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_nests_across_threads_and_restores(enabled):
  """Off while any pause is open (one ending in another thread first included), then as before."""
  (gc.enable if enabled else gc.disable)()
  try:
    inner_open, outer_may_close, inner_done = (threading.Event() for _ in range(3))

    def inner():
      with hostmem.gc_paused():
        inner_open.set()
        outer_may_close.wait(10)
      inner_done.set()

    with hostmem.gc_paused():
      assert not gc.isenabled()
      thread = threading.Thread(target=inner)
      thread.start()
      assert inner_open.wait(10)
    assert not gc.isenabled()  # the other thread's pause is still open
    outer_may_close.set()
    thread.join(10)
    assert inner_done.is_set() and gc.isenabled() == enabled
  finally:
    gc.enable()
