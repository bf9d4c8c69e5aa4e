"""The TopK SAE's k-sparse kernels on XLA's CPU backend: C++ behind jax's FFI (cpu_kernels.cc).

On a CPU the TopK step's time goes to XLA's TopK, which sorts one row at a time, and to its
scatter-adds, which write one element at a time (BENCHMARKS.md). These four kernels do that
work at memory speed on XLA's own thread pool:

  top_k(x, k)                     lax.top_k exactly: the same values, indices and tie order
  gather_sum(coef, idx, table)    out[b] = sum_j coef[b, j] table[idx[b, j]]
  gather_dot(rows, idx, table)    out[b, j] = <rows[b], table[idx[b, j]]>
  scatter_rows(coef, idx, rows, n)  (out [n, d], sums [n]): the transposes of the two above

and one that is not XLA's: `gather_rows`, the store's reader's one-copy gather of a batch's rows
from its shards (called through ctypes, on the host).

The library is compiled from the shipped source with the system's C++ compiler the first time
it is needed, into a per-machine cache, the way a CUDA extension is; where no compiler is found
`available()` is False and the trainer keeps XLA's own paths (the same numbers). Each kernel
has a pure-jax reference below it, which the tests hold it to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
TARGETS = {"jaxsae_top_k": "JaxsaeTopK", "jaxsae_gather_sum": "JaxsaeGatherSum",
           "jaxsae_gather_dot": "JaxsaeGatherDot", "jaxsae_scatter_rows": "JaxsaeScatterRows"}
# JAXSAE_CPU_KERNELS=0 turns them off (the XLA paths then run, as on a machine without g++).
ENV = "JAXSAE_CPU_KERNELS"


def _cpu_flags() -> str:
  # -march=native code is only valid on CPUs with the same instruction sets, so they are part
  # of the cache key (a home directory shared across machines).
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


# Header warnings (XLA's own) are not ours to fix.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def library_path() -> pathlib.Path:
  """Where the build of this source, with these flags, for this jaxlib and CPU lives."""
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
      platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
  return cache / "jaxsae" / f"cpu_kernels-{key}.so"


def build(path: pathlib.Path) -> None:
  """Compiles the library to `path`, atomically: a concurrent build or a killed one never
  leaves a half-written library where `load` looks."""
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  if cxx is None:
    raise OSError("no C++ compiler (c++, g++ or clang++) on PATH")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  try:
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      raise OSError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


@functools.cache
def _load() -> bool:
  if os.environ.get(ENV, "1") == "0":
    return False
  try:
    path = library_path()
    if not path.exists():
      build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, AttributeError) as e:
    warnings.warn(f"jaxsae's CPU kernels are off, XLA's slower paths run instead: {e}")
    return False
  _library.append(lib)
  return True


_library: list = []


@functools.cache
def gather_rows():
  """The store's one-copy row gather (JaxsaeGatherRows in cpu_kernels.cc) as a ctypes function,
  or None where the library is off or not built (the store then gathers with numpy)."""
  if not _load():
    return None
  fn = _library[0].JaxsaeGatherRows
  fn.restype = None
  fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
  return fn


def available() -> bool:
  """Whether jitted code traced now may call the kernels: the CPU backend on one device (a
  custom call has no sharding rule, so a mesh of CPU devices keeps XLA's paths) and a library
  built and loaded."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and _load()


def _call(target: str, outs, *args):
  if not _load():
    raise RuntimeError(f"jaxsae's CPU kernels are not built (see the warning above, or {ENV})")
  # broadcast_all: under vmap every operand gets the batch axis in front, which the kernels
  # take as one more leading dimension.
  return jax.ffi.ffi_call(target, outs, vmap_method="broadcast_all")(*args)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k(x, k) for float32 x, to the bit, and differentiable as it is."""
  shape = x.shape[:-1] + (k,)
  return _call("jaxsae_top_k", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                jax.ShapeDtypeStruct(shape, jnp.int32)), x)


@top_k.defjvp
def _top_k_jvp(k, primals, tangents):
  vals, idx = top_k(primals[0], k)
  d_vals = jnp.take_along_axis(tangents[0], idx, axis=-1)
  return (vals, idx), (d_vals, jnp.zeros(idx.shape, jax.dtypes.float0))


def gather_sum(coef: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
  """[..., B, d]: sum_j coef[..., b, j] * table[idx[..., b, j]]; table [n, d] or [..., n, d]."""
  out = jax.ShapeDtypeStruct(idx.shape[:-1] + table.shape[-1:], jnp.float32)
  return _call("jaxsae_gather_sum", out, coef, idx, table)


def gather_dot(rows: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
  """[..., B, k]: <rows[..., b], table[idx[..., b, j]]>."""
  return _call("jaxsae_gather_dot", jax.ShapeDtypeStruct(idx.shape, jnp.float32), rows, idx, table)


def scatter_rows(coef: jax.Array, idx: jax.Array, rows: jax.Array, n: int):
  """([..., n, d], [..., n]): each latent's sum of coef[b, j] * rows[b] over the (b, j) that
  selected it, and its sum of coef[b, j]."""
  lead = idx.shape[:-2]
  return _call("jaxsae_scatter_rows", (
      jax.ShapeDtypeStruct(lead + (n, rows.shape[-1]), jnp.float32),
      jax.ShapeDtypeStruct(lead + (n,), jnp.float32)), coef, idx, rows)


# The references: what each kernel computes, in jax (tests compare them).

def _gathered(table, idx):
  """table[idx] per leading problem: [..., B, k, d]."""
  if table.ndim == 2:
    return table[idx]
  return jax.vmap(_gathered)(table, idx)


def gather_sum_reference(coef, idx, table):
  return jnp.einsum("...bk,...bkd->...bd", coef, _gathered(table, idx))


def gather_dot_reference(rows, idx, table):
  return jnp.einsum("...bd,...bkd->...bk", rows, _gathered(table, idx))


def scatter_rows_reference(coef, idx, rows, n):
  def one(c, i, r):
    out = jnp.zeros((n, r.shape[-1]), jnp.float32).at[i.reshape(-1)].add(
        (c[..., None] * r[:, None, :]).reshape(-1, r.shape[-1]))
    return out, jnp.zeros(n, jnp.float32).at[i.reshape(-1)].add(c.reshape(-1))
  for _ in idx.shape[:-2]:
    one = jax.vmap(one)
  return one(coef, idx, rows)
