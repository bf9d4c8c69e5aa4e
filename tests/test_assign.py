"""The exact assignment: scipy's objective on every path, and a certificate that holds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxsae import assign
from jaxsae.errors import JaxsaeError


def unit(rng, n, d):
  return assign.unit_rows(rng.standard_normal((n, d)))


def planted(rng, n, d, noise=0.4, orphans=0.3):
  """b is a permuted, noisy copy of a with a fraction of unrelated rows: like a real SAE pair."""
  a = rng.standard_normal((n, d)).astype(np.float32)
  b = a[rng.permutation(n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
  lost = rng.random(n) < orphans
  b[lost] = rng.standard_normal((int(lost.sum()), d))
  return assign.unit_rows(a), assign.unit_rows(b)


def scipy_objective(a, b):
  sim = a @ b.T
  r, c = linear_sum_assignment(sim, maximize=True)
  return float(sim[r, c].sum(dtype=np.float64))


def is_permutation(cols, n):
  return np.array_equal(np.sort(cols), np.arange(n))


@pytest.mark.parametrize("n,d", [(1, 4), (7, 3), (64, 16), (300, 32)])
@pytest.mark.parametrize("kind", ["random", "planted"])
def test_dense_and_sparse_equal_scipy(n, d, kind):
  rng = np.random.default_rng(n * 31 + d)
  a, b = (unit(rng, n, d), unit(rng, n, d)) if kind == "random" else planted(rng, n, d)
  want = scipy_objective(a, b)
  for res in (assign.assign_dense(a, b, block_size=64),
              assign.assign_sparse(a, b, k=8, block_size=64)):
    assert is_permutation(res.cols, n)
    assert res.objective == pytest.approx(want, rel=1e-6, abs=1e-5)
    # The reported cosines are the partners' cosines, and their sum is the objective.
    np.testing.assert_allclose(res.cos, np.sum(a * b[res.cols], axis=1), atol=1e-5)
    assert res.objective == pytest.approx(res.cos.sum(dtype=np.float64), abs=1e-4)
    np.testing.assert_allclose(res.best, (a @ b.T).max(axis=1), atol=1e-5)


def test_structured_instances():
  rng = np.random.default_rng(0)
  d = 8
  # An exact permutation: the optimum is n with every cosine 1.
  a = unit(rng, 50, d)
  perm = rng.permutation(50)
  for res in (assign.assign_dense(a, a[perm]), assign.assign_sparse(a, a[perm], k=4)):
    np.testing.assert_array_equal(perm[res.cols], np.arange(50))
    assert res.objective == pytest.approx(50, abs=1e-4)
  # Antipodal copy: the best bijection still exists and equals scipy's.
  b = -a[perm]
  assert assign.assign_sparse(a, b, k=4).objective == pytest.approx(scipy_objective(a, b),
                                                                    abs=1e-4)
  # Dead (all-zero) latents normalise to zero rows: cosine 0 with everything.
  z = a.copy()
  z[:10] = 0
  res = assign.assign_sparse(assign.unit_rows(z), a, k=4)
  assert res.objective == pytest.approx(scipy_objective(assign.unit_rows(z), a), abs=1e-4)


def test_ties():
  rng = np.random.default_rng(1)
  # Every row identical: all n! bijections tie; any permutation with the tied total is right.
  a = np.repeat(unit(rng, 1, 6), 40, axis=0)
  b = unit(rng, 40, 6)
  want = scipy_objective(a, b)
  for res in (assign.assign_dense(a, b), assign.assign_sparse(a, b, k=3)):
    assert is_permutation(res.cols, 40)
    assert res.objective == pytest.approx(want, abs=1e-4)
  # A matrix of one repeated value, straight into the dense solver.
  cols = assign.solve_dense(np.full((5, 5), 0.5, np.float32))
  assert is_permutation(cols, 5)


@pytest.mark.parametrize("n_a,n_b", [(5, 9), (9, 5), (16, 24), (1, 3)])
def test_unequal_widths_match_every_latent_of_the_narrower_side(n_a, n_b):
  rng = np.random.default_rng(n_a * 7 + n_b)
  a, b = unit(rng, n_a, 6), unit(rng, n_b, 6)
  for method in ("auto", "dense"):
    res = assign.assign(a, b, method=method, dense_max=2)  # auto goes dense all the same
    assert res.method == "dense"
    assert res.objective == pytest.approx(scipy_objective(a, b), abs=1e-5)
    has = res.cols >= 0
    assert has.sum() == min(n_a, n_b)  # one partner each for the narrower side
    assert len(set(res.cols[has])) == has.sum()  # one-to-one
    np.testing.assert_allclose(res.cos[has], np.sum(a[has] * b[res.cols[has]], axis=1),
                               atol=1e-5)
    assert np.isnan(res.cos[~has]).all()
  rows = assign.solve_dense((a @ b.T).astype(np.float32))
  assert (rows == -1).sum() == max(n_a - n_b, 0)


def test_unequal_widths_refused_by_the_sparse_solver_and_other_d_in():
  rng = np.random.default_rng(2)
  with pytest.raises(JaxsaeError, match="sparse solver needs equal latent counts"):
    assign.assign(unit(rng, 5, 4), unit(rng, 6, 4), method="sparse")
  with pytest.raises(JaxsaeError, match="sparse solver needs equal latent counts"):
    assign.assign_sparse(unit(rng, 5, 4), unit(rng, 6, 4))
  with pytest.raises(JaxsaeError, match="d_in"):
    assign.assign(unit(rng, 5, 4), unit(rng, 5, 3))


@pytest.mark.parametrize("n", [256, 1024, 2048])
@pytest.mark.parametrize("kind", ["planted", "random"])
@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_sparse_agrees_with_scipy_and_certifies(n, kind, precision):
  rng = np.random.default_rng(n)
  a, b = planted(rng, n, 48) if kind == "planted" else (unit(rng, n, 48), unit(rng, n, 48))
  want = scipy_objective(a, b)
  res = assign.assign_sparse(a, b, k=16, certify_k=16, block_size=256, precision=precision)
  assert res.method == "sparse"
  assert is_permutation(res.cols, n)
  assert res.objective == pytest.approx(want, rel=1e-6)
  # The certificate: a dual bound no bijection can beat, within 1e-6 of the objective.
  assert res.gap is not None and res.gap <= 1e-6 * res.objective
  assert res.dual_bound >= want - 1e-4
  assert res.num_candidates < n * n / 4  # it never built the dense problem


def test_certificate_repairs_too_few_candidates():
  """With one candidate per row and column the restricted optimum is wrong at first; the
  full-matrix certificate finds the entries that beat it and the re-solve is exact."""
  rng = np.random.default_rng(3)
  a, b = unit(rng, 200, 6), unit(rng, 200, 6)  # low d: many near-ties, a hard instance
  res = assign.assign_sparse(a, b, k=1, col_k=0, block_size=64)
  assert res.rounds > 1
  assert res.objective == pytest.approx(scipy_objective(a, b), rel=1e-6)
  assert res.gap <= 1e-6 * res.objective


def test_dual_bound_is_an_upper_bound_for_any_duals():
  rng = np.random.default_rng(4)
  a, b = unit(rng, 64, 8), unit(rng, 64, 8)
  v = rng.standard_normal(64)
  for precision in ("bfloat16", "float32"):
    cert = assign.certify(a, b, np.zeros(64), v, k=4, block_size=16, precision=precision)
    assert cert.bound >= scipy_objective(a, b) - 1e-5
    # The bound's u covers every entry of the full matrix, screened or recomputed.
    sim = a.astype(np.float64) @ b.T.astype(np.float64)
    assert (cert.u[:, None] >= sim - v[None, :].astype(np.float32) - 1e-6).all()


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["planted", "random"])
def test_tail_certificate_covers_every_entry_without_the_full_matrix(precision, kind):
  """certify_tail computes only the entries below each row's ceiling; its u must still cover
  every entry of the full matrix, for the restricted duals and for arbitrary ones."""
  rng = np.random.default_rng(6)
  n, k = 512, 8
  a, b = planted(rng, n, 32) if kind == "planted" else (unit(rng, n, 32), unit(rng, n, 32))
  rows, cols, vals, _ = assign.candidates(a, b, k=k, block_size=128, precision=precision)
  ceiling = (vals[:n * k].reshape(n, k).min(axis=1).astype(np.float64)
             + 2 * assign.screen_error(32, precision))
  sim = a.astype(np.float64) @ b.T.astype(np.float64)
  off_list = np.ones((n, n), bool)
  off_list[rows, cols] = False
  assert (sim[off_list] <= np.broadcast_to(ceiling[:, None], (n, n))[off_list]).all()
  ident = np.arange(n)
  rows, cols, vals = assign._dedupe(np.r_[rows, ident], np.r_[cols, ident],
                                    np.r_[vals, assign.paired_cosine(a, b)], n)
  match = assign.solve_sparse(rows, cols, vals, n)
  u, v = assign.duals(rows, cols, vals, match, n)
  for u, v in ((u, v), (np.zeros(n), rng.uniform(-0.2, 0.4, n))):
    cert = assign.certify_tail(a, b, u, v, ceiling, max_entries=n * n,
                               block_size=64)
    covered = cert.u[:, None] + v[None, :] >= sim - 1e-6
    # Candidate entries are the restricted duals' job; every other entry is the certificate's.
    assert covered[off_list].all()
    if u.any():  # the restricted duals: few entries to look at, and a valid bound
      assert cert.pairs_checked < n * n / 4
      assert cert.bound >= scipy_objective(a, b) - 1e-4
  assert assign.certify_tail(a, b, np.zeros(n), np.full(n, -1.0), ceiling, max_entries=10) is None


def test_cosine_matrix_blocks():
  rng = np.random.default_rng(5)
  a, b = unit(rng, 37, 5), unit(rng, 37, 5)
  np.testing.assert_allclose(assign.cosine_matrix(a, b, block_size=8), a @ b.T, atol=1e-6)
  w = np.zeros((3, 4))
  w[1] = [3, 4, 0, 0]
  np.testing.assert_allclose(assign.unit_rows(w), [[0] * 4, [0.6, 0.8, 0, 0], [0] * 4])
