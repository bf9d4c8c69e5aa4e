"""jaxsae's C++ CPU kernels against the jax they replace: lax.top_k to the bit, the sparse row
products to float rounding, under jit, vmap and grad."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="no C++ compiler: the kernels are not built here")


def awkward_rows(shape, seed=0):
  """ReLU-like rows with the ties top-k must break as XLA does: runs of +0, -0 and equal values."""
  x = np.maximum(np.random.default_rng(seed).normal(size=shape), 0).astype(np.float32)
  x[..., 1::7] = -0.0
  x[..., ::5] = 0.25
  return x


@pytest.mark.parametrize("shape,k", [((64, 1024), 32), ((3, 5, 300), 7), ((4, 33), 33),
                                     ((9, 40), 1), ((2, 4096), 64), ((16, 17), 16)])
def test_top_k_is_lax_top_k_to_the_bit(shape, k):
  x = awkward_rows(shape)
  vals, idx = jax.jit(lambda a: cpu_kernels.top_k(a, k))(x)
  ref_vals, ref_idx = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(np.asarray(vals).view(np.int32), np.asarray(ref_vals).view(np.int32))


def test_top_k_orders_nan_and_infinities_as_xla_does():
  x = np.array([[0.0, -0.0, np.nan, 1.0, np.inf, -np.nan, 1.0, -np.inf, -0.0, 0.0]], np.float32)
  for k in (1, 4, 10):
    vals, idx = cpu_kernels.top_k(x, k)
    ref_vals, ref_idx = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(np.asarray(vals).view(np.int32),
                                  np.asarray(ref_vals).view(np.int32))


def test_top_k_under_vmap_and_its_gradient():
  x = awkward_rows((3, 8, 200), seed=1) + 0.01 * np.arange(200, dtype=np.float32)
  batched = jax.vmap(lambda a: cpu_kernels.top_k(a, 5))(x)
  ref = jax.lax.top_k(x, 5)
  np.testing.assert_array_equal(batched[1], ref[1])
  w = jnp.arange(5.0)
  grad = jax.grad(lambda a: (cpu_kernels.top_k(a, 5)[0] * w).sum())(x)
  ref_grad = jax.grad(lambda a: (jax.lax.top_k(a, 5)[0] * w).sum())(x)
  np.testing.assert_array_equal(grad, ref_grad)


def sparse_problem(problems=(), batch=48, k=6, d=20, n=40, seed=0):
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(n, k, replace=False) for _ in range(int(np.prod(problems)) * batch)])
  return (rng.normal(size=(*problems, batch, k)).astype(np.float32),
          idx.reshape(*problems, batch, k).astype(np.int32),
          rng.normal(size=(*problems, batch, d)).astype(np.float32),
          rng.normal(size=(n, d)).astype(np.float32),
          rng.normal(size=(*problems, n, d)).astype(np.float32))


@pytest.mark.parametrize("problems", [(), (3,), (2, 2)])
def test_row_products_equal_their_references(problems):
  coef, idx, rows, table, tables = sparse_problem(problems)
  n = table.shape[0]
  for t in (table, tables):
    np.testing.assert_allclose(cpu_kernels.gather_sum(coef, idx, t),
                               cpu_kernels.gather_sum_reference(coef, idx, t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cpu_kernels.gather_dot(rows, idx, t),
                               cpu_kernels.gather_dot_reference(rows, idx, t), rtol=1e-5, atol=1e-5)
  out, sums = cpu_kernels.scatter_rows(coef, idx, rows, n)
  ref_out, ref_sums = cpu_kernels.scatter_rows_reference(coef, idx, rows, n)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-6)
  unused = np.setdiff1d(np.arange(n), idx[..., :, :].reshape(-1))
  if problems == () and unused.size:
    assert not np.asarray(out)[unused].any()  # rows nobody selected are written, as zeros


def test_row_products_under_vmap_with_a_shared_table():
  coef, idx, rows, table, _ = sparse_problem((4,))
  got = jax.vmap(cpu_kernels.gather_sum, in_axes=(0, 0, None))(coef, idx, table)
  np.testing.assert_allclose(got, cpu_kernels.gather_sum_reference(coef, idx, table), rtol=1e-5,
                             atol=1e-5)
  got = jax.vmap(lambda c, i, r: cpu_kernels.scatter_rows(c, i, r, table.shape[0]))(coef, idx, rows)
  ref = cpu_kernels.scatter_rows_reference(coef, idx, rows, table.shape[0])
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_index_out_of_range_is_an_error_not_a_stray_write():
  coef, idx, rows, table, _ = sparse_problem()
  idx[3, 2] = table.shape[0]
  with pytest.raises(Exception, match="index out of range"):
    jax.block_until_ready(cpu_kernels.scatter_rows(coef, idx, rows, table.shape[0]))


@pytest.mark.slow
def test_the_switch_turns_them_off_and_the_build_is_cached(forks, tmp_path):
  assert cpu_kernels.library_path().exists()
  # Each in a process of its own, forked (tests/forks.py): the switch and the cache's place are
  # read when the kernels are first asked for, which no process has done before its fork.
  script = tmp_path / "available.py"
  script.write_text("from jaxsae import cpu_kernels; print(cpu_kernels.available())")
  out = forks.run(script=str(script), env={**os.environ, cpu_kernels.ENV: "0"})
  assert out.stdout.strip() == "False", out.stderr
  # A fresh cache builds once, to a complete library, and leaves no temporary file behind.
  out = forks.run(script=str(script), env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c")})
  assert out.stdout.strip() == "True", out.stderr
  assert [p.suffix for p in (tmp_path / "c" / "jaxsae").iterdir()] == [".so"]
