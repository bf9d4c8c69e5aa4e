"""The optimal bijection between two SAEs' latents, exactly, at any size, with a certificate.

Given unit rows a [n, d] and b [n, d], find the permutation sigma maximising
sum_i cos(a_i, b_sigma(i)). SAEs of different widths (a [n_a, d], b [n_b, d]) get the
maximum-total one-to-one matching instead: every latent of the narrower side has a partner, and
n_a - n_b latents of the wider one have none (dense path only). Two exact paths:

* dense: the full cosine matrix from a blocked jitted kernel, solved by scipy's
  `linear_sum_assignment`, the reference. scipy copies the matrix to float64, so the
  path needs ~12 n^2 bytes: 3 GB at n=16,384, 13 GB at 32,768, 51 GB at 65,536.
* sparse + certificate, memory O(n k + block_size n):
  1. one blocked pass keeps every row's top-k cosines as candidate edges;
  2. scipy's sparse solver (`min_weight_full_bipartite_matching`, LAPJVsp) finds the optimum
     restricted to them, and a Bellman-Ford pass on its residual graph gives dual variables
     (u, v) for it;
  3. a second blocked pass over the FULL matrix proves global optimality: by LP duality,
         sum_i max_j (c_ij - v_j) + sum_j v_j  >=  the total cosine of every bijection,
     so with u_i >= max_j (c_ij - v_j) for all i the gap sum(u) + sum(v) - objective bounds
     how far from optimal the restricted optimum can be. Entries with c_ij - v_j > u_i are
     added as candidates and the restricted problem re-solved until the gap is <= 1e-6 of
     the objective (in practice 0 up to float32 rounding).

The full-matrix passes are the cost, so they multiply bfloat16 copies (2.3x the float32 rate on
this AVX512-BF16 CPU, more on accelerators) and make their conclusions rigorous with an error
bound: an entry whose screened score could, within that bound, exceed its row's dual is
recomputed in float32 (and a row with too many such entries in full). Cosines, objectives and
certificates are therefore exact for the float32 cosines, as in the dense path.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from jaxsae.errors import JaxsaeError

# Relative optimality gap the certificate must reach: (bound - objective) / |objective|.
REL_GAP = 1e-6
# Entries that beat their row's dual by less than this are float32 noise, not violations.
VIOLATION_EPS = 1e-7
# certify_tail also returns entries this close to violating: the next restricted problem gets
# them before they are needed, which halves the rounds on SAE pairs (4 -> 2 at 32,768).
NEAR_VIOLATION = 0.02


@dataclasses.dataclass(frozen=True)
class Assignment:
  """An optimal bijection rows -> columns and what proves it."""
  cols: np.ndarray  # [n] int: the partner column of each row; -1 for none (more rows than cols)
  cos: np.ndarray  # [n] float32: the cosine with that partner; NaN where there is none
  best: np.ndarray  # [n] float32: each row's best cosine over all columns (no bijection)
  objective: float  # sum of `cos` over the matched rows
  dual_bound: float | None  # an upper bound on every bijection's total; None for dense
  gap: float | None  # dual_bound - objective
  method: str  # "dense" or "sparse"
  rounds: int = 1  # restricted solves, each followed by one certificate pass
  num_candidates: int = 0  # candidate edges in the final restricted problem
  seconds: float = 0.0


def unit_rows(w: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm in float32; all-zero rows (dead latents) stay zero."""
  w = np.asarray(w, np.float32)
  norm = np.linalg.norm(w, axis=1, keepdims=True)
  return w / np.where(norm > 0, norm, 1.0)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise JaxsaeError(f"cannot compare latents of shapes {list(a.shape)} and {list(b.shape)}; "
                      "both SAEs need [n_latents, d_in] weights of the same d_in")


def _check_square(a: np.ndarray, b: np.ndarray) -> None:
  if a.shape[0] != b.shape[0]:
    raise JaxsaeError(f"the sparse solver needs equal latent counts, got {a.shape[0]} and "
                      f"{b.shape[0]}; SAEs of different widths are matched by the dense "
                      "solver (--assignment=auto or dense)")


def _blocks(n: int, block_size: int):
  for lo in range(0, n, block_size):
    yield lo, min(lo + block_size, n)


def _padded(x: np.ndarray, lo: int, hi: int, block_size: int) -> np.ndarray:
  """Rows lo:hi padded to a full block so every block reuses one compiled kernel."""
  blk = x[lo:hi]
  if hi - lo < block_size:
    blk = np.concatenate([blk, np.zeros((block_size - (hi - lo), x.shape[1]), x.dtype)])
  return blk


@functools.lru_cache(maxsize=None)
def _kernels():
  """The jitted block kernels, built on first use so importing this module stays cheap."""
  import jax
  import jax.numpy as jnp

  def dot(a, b):
    return jnp.einsum("id,jd->ij", a, b, preferred_element_type=jnp.float32)

  def exact(a_blk, b, idx):
    """float32 cosines of each row of a_blk with the rows idx [B, k] of b (a gather)."""
    return jnp.einsum("id,ikd->ik", a_blk, b[idx], preferred_element_type=jnp.float32)

  @jax.jit
  def dense_block(a_blk, b):
    return dot(a_blk, b)

  @functools.partial(jax.jit, static_argnames=("k", "col_k"))
  def candidates_block(a_blk, a_scr, b, b_scr, valid, col_vals, col_idx, lo, *, k, col_k):
    """Row top-k by the screening cosines (exact values for them), and the running column
    top-col_k merged with this block's (screening values; made exact later)."""
    c = dot(a_scr, b_scr)
    c = jnp.where(jnp.arange(c.shape[0])[:, None] < valid, c, -jnp.inf)
    _, row_idx = jax.lax.top_k(c, k)
    row_vals = exact(a_blk, b, row_idx)
    if col_k:
      bv, bi = jax.lax.top_k(c.T, min(col_k, c.shape[0]))
      vals = jnp.concatenate([col_vals, bv], axis=1)
      idx = jnp.concatenate([col_idx, bi + lo], axis=1)
      col_vals, pick = jax.lax.top_k(vals, col_k)
      col_idx = jnp.take_along_axis(idx, pick, axis=1)
    return row_vals, row_idx, col_vals, col_idx

  @functools.partial(jax.jit, static_argnames="k")
  def certify_block(a_blk, a_scr, b, b_scr, v, u, delta, *, k):
    """Per row: the k largest screened reduced scores c_ij - v_j made exact, and how many
    entries could, within the screening error delta, exceed the row's dual u_i."""
    r = dot(a_scr, b_scr) - v
    _, idx = jax.lax.top_k(r, k)
    count = jnp.sum(r > (u - delta)[:, None], axis=1)
    return exact(a_blk, b, idx) - v[idx], idx, count

  @functools.partial(jax.jit, static_argnames="k")
  def row_block(a_blk, b, v, *, k):
    """Exact float32 row maxima of c_ij - v_j and each row's k largest entries."""
    r = dot(a_blk, b) - v
    vals, idx = jax.lax.top_k(r, k)
    # A separate max, not vals[:, 0]: a second use of top_k's values makes XLA:CPU lower it
    # to a full sort of every row, ~50x slower.
    return r.max(axis=1), vals, idx

  @jax.jit
  def paired(a, b):
    return jnp.einsum("id,id->i", a, b, preferred_element_type=jnp.float32)

  return dense_block, candidates_block, certify_block, row_block, paired


def cosine_matrix(a: np.ndarray, b: np.ndarray, block_size: int = 1024) -> np.ndarray:
  """The dense cosine matrix a @ b.T [n_a, n_b] in float32, computed block by block."""
  dense_block, *_ = _kernels()
  out = np.empty((a.shape[0], b.shape[0]), np.float32)
  for lo, hi in _blocks(a.shape[0], block_size):
    out[lo:hi] = np.asarray(dense_block(_padded(a, lo, hi, block_size), b))[:hi - lo]
  return out


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """cos(a_i, b_i) for every i, by the same float32 kernel arithmetic as the blocks."""
  *_, paired = _kernels()
  return np.asarray(paired(a, b))


def solve_dense(sim: np.ndarray) -> np.ndarray:
  """scipy's exact maximum-total assignment of a [n_a, n_b] matrix: the partner of every row,
  -1 for the n_a - n_b rows left without one when there are more rows than columns (scipy
  matches min(n_a, n_b) pairs, maximising their total)."""
  from scipy.optimize import linear_sum_assignment
  if sim.ndim != 2:
    raise JaxsaeError(f"the assignment needs a similarity matrix, got shape {list(sim.shape)}")
  rows, cols = linear_sum_assignment(sim, maximize=True)
  out = np.full(sim.shape[0], -1, np.int64)
  out[rows] = cols
  return out


def assign_dense(a: np.ndarray, b: np.ndarray, block_size: int = 1024) -> Assignment:
  """The exact bijection via the full matrix and scipy (the reference path); for unequal
  widths the maximum-total one-to-one matching (rows without a partner: -1, cosine NaN)."""
  t0 = time.perf_counter()
  _check_pair(a, b)
  sim = cosine_matrix(a, b, block_size)
  cols = solve_dense(sim)
  has = cols >= 0
  cos = np.full(len(cols), np.nan, np.float32)
  cos[has] = sim[np.flatnonzero(has), cols[has]]
  best = sim.max(axis=1)
  del sim
  return Assignment(cols=cols, cos=cos, best=best,
                    objective=float(cos[has].sum(dtype=np.float64)), dual_bound=None, gap=None,
                    method="dense", num_candidates=a.shape[0] * b.shape[0],
                    seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The sparse path.


def _screen_copy(x: np.ndarray, precision: str):
  """The copy the full-matrix passes multiply: bfloat16 halves their cost on CPUs with
  AVX512-BF16 and on accelerators; its error is bounded by `screen_error`."""
  if precision == "bfloat16":
    import ml_dtypes
    return x.astype(ml_dtypes.bfloat16)
  if precision == "float32":
    return x
  raise JaxsaeError(f"precision {precision!r}: use bfloat16 or float32")


def screen_error(d: int, precision: str) -> float:
  """A bound on |screened cosine - float32 cosine| for unit vectors of dimension d.

  Rounding each coordinate to bfloat16 perturbs it by at most 2^-9 relatively, so a product
  by at most 2^-8 + 2^-18 and the dot product by that times sum_k |a_k b_k| <= 1
  (Cauchy-Schwarz). Float32 accumulation of d terms adds at most d * 2^-24 (for both the
  screened and the exact value), and the subtraction of v one more rounding.
  """
  rounding = 2.0 ** -8 + 2.0 ** -18 if precision == "bfloat16" else 0.0
  return rounding + (2 * d + 8) * 2.0 ** -24


def edge_cosines(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 chunk: int = 1 << 16) -> np.ndarray:
  """float32 cos(a_rows[e], b_cols[e]) for edge lists, in fixed-size chunks."""
  *_, paired = _kernels()
  out = np.empty(len(rows), np.float32)
  for lo in range(0, len(rows), chunk):
    r, c = rows[lo:lo + chunk], cols[lo:lo + chunk]
    m = len(r)
    if m < chunk and len(rows) > chunk:  # pad to the compiled chunk shape
      r, c = np.pad(r, (0, chunk - m)), np.pad(c, (0, chunk - m))
    out[lo:lo + m] = np.asarray(paired(a[r], b[c]))[:m]
  return out


def candidates(a: np.ndarray, b: np.ndarray, k: int = 32, col_k: int = 0,
               block_size: int = 1024, precision: str = "bfloat16",
               progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Candidate edges (rows, cols, exact cos): every row's top-k, every column's top-col_k;
  and each row's best cosine.

  Ranking uses the screening precision; the returned cosines are float32-exact, and so is
  the best cosine unless more than k entries of a row lie within twice the screening error
  (~0.008) of its maximum. Column candidates help when many rows compete for the same few
  columns (orphans in real pairs).
  """
  import jax.numpy as jnp
  _, candidates_block, *_ = _kernels()
  n = a.shape[0]
  k, col_k = min(k, n), min(col_k, n)
  a_scr, b_scr = _screen_copy(a, precision), _screen_copy(b, precision)
  col_vals = jnp.full((n, max(col_k, 1)), -jnp.inf, jnp.float32)
  col_idx = jnp.zeros((n, max(col_k, 1)), jnp.int32)
  rv, ri = [], []
  for lo, hi in _blocks(n, block_size):
    row_vals, row_idx, col_vals, col_idx = candidates_block(
        _padded(a, lo, hi, block_size), _padded(a_scr, lo, hi, block_size), b, b_scr,
        hi - lo, col_vals, col_idx, lo, k=k, col_k=col_k)
    rv.append(np.asarray(row_vals)[:hi - lo])
    ri.append(np.asarray(row_idx)[:hi - lo])
    if progress is not None:
      progress(hi - lo)
  rows = np.repeat(np.arange(n), k)
  cols = np.concatenate(ri).reshape(-1).astype(np.int64)
  vals = np.concatenate(rv)
  best = vals.max(axis=1)
  vals = vals.reshape(-1)
  if col_k:
    c_rows = np.asarray(col_idx).reshape(-1).astype(np.int64)
    c_cols = np.repeat(np.arange(n), col_k)
    rows, cols = np.concatenate([rows, c_rows]), np.concatenate([cols, c_cols])
    vals = np.concatenate([vals, edge_cosines(a, b, c_rows, c_cols)])
  return rows, cols, vals, best


def _dedupe(rows, cols, vals, n):
  key = rows.astype(np.int64) * n + cols
  key, first = np.unique(key, return_index=True)
  return rows[first], cols[first], vals[first]


def solve_sparse(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
                 n: int) -> np.ndarray:
  """The maximum-total perfect matching using only the given edges (which must admit one)."""
  import scipy.sparse
  from scipy.sparse.csgraph import min_weight_full_bipartite_matching
  # Costs 2 - cos lie in [1, 3]: positive, so no edge is an explicit zero that the sparse
  # solver would drop, and a constant shift leaves the optimal perfect matching unchanged.
  graph = scipy.sparse.csr_matrix((2.0 - vals.astype(np.float64), (rows, cols)), shape=(n, n))
  _, match = min_weight_full_bipartite_matching(graph)
  return match.astype(np.int64)


def duals(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, match: np.ndarray,
          n: int, max_rounds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Optimal dual variables (u, v) of the restricted problem at its optimal matching.

  Complementary slackness asks u_i + v_j = c_ij on matched edges and >= c_ij on the others.
  With v_j = c_{i'j} - u_{i'} for j's matched row i', the others read
  u_i >= u_{i'} + c_ij - c_{i'j}: difference constraints, solved by Bellman-Ford longest
  paths on the residual graph (no positive cycle exists because the matching is optimal).
  """
  vals = vals.astype(np.float64)
  owner = np.empty(n, np.int64)
  owner[match] = np.arange(n)
  matched_cost = np.empty(n, np.float64)  # c_{i' j} for every column j
  on = match[rows] == cols
  matched_cost[cols[on]] = vals[on]
  src, dst = owner[cols[~on]], rows[~on]
  w = vals[~on] - matched_cost[cols[~on]]
  order = np.argsort(dst, kind="stable")
  src, dst, w = src[order], dst[order], w[order]
  starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]]) if len(dst) else np.array([], int)
  heads = dst[starts]
  u = np.zeros(n, np.float64)
  for _ in range(max_rounds or n + 1):
    if not len(dst):
      break
    best = np.maximum.reduceat(u[src] + w, starts)
    improve = best > u[heads] + 1e-12
    if not improve.any():
      break
    u[heads[improve]] = best[improve]
  else:
    raise RuntimeError("the restricted matching is not optimal (a positive residual cycle)")
  v = matched_cost - u[owner]
  return u, v


@dataclasses.dataclass(frozen=True)
class Certificate:
  """What a certificate (a full pass, or `certify_tail`) proved about column duals v."""
  u: np.ndarray  # [n] float64: u_i >= c_ij - v_j for every j, so sum(u) + sum(v) bounds
  bound: float  # sum(u) + sum(v): no bijection's total cosine exceeds it
  rows: np.ndarray  # violating entries c_ij - v_j > u_i (certify_tail: or nearly): candidates
  cols: np.ndarray
  vals: np.ndarray  # their float32 cosines
  rows_recomputed: int  # rows whose screen was too close to call, redone in float32
  pairs_checked: int = 0  # entries certify_tail had to look at (0 after a full pass)


def certify(a: np.ndarray, b: np.ndarray, u: np.ndarray, v: np.ndarray, k: int = 32,
            block_size: int = 1024, precision: str = "bfloat16",
            progress=None) -> Certificate:
  """One pass over the full matrix: a dual bound that holds for every entry, and violators.

  Entry (i, j) is looked at exactly only if its screened reduced score c_ij - v_j comes
  within the screening error of u_i; all others provably satisfy c_ij - v_j <= u_i. A row
  with more than k such entries is recomputed in float32 in full.
  """
  _, _, certify_block, row_block, _ = _kernels()
  n, d = a.shape
  k = min(k, n)
  v32 = np.asarray(v, np.float32)
  u32 = np.asarray(u, np.float32)
  delta = np.float32(screen_error(d, precision))
  a_scr, b_scr = _screen_copy(a, precision), _screen_copy(b, precision)
  u_cert = np.asarray(u, np.float64).copy()
  vr, vc, vv, redo = [], [], [], []

  def take(lo, exact, idx, rows_ok):
    """Raises u_cert to the exact maxima and keeps the violators, for rows lo + rows_ok."""
    i = lo + rows_ok
    ex, ix = exact[rows_ok], idx[rows_ok]
    np.maximum.at(u_cert, i, ex.max(axis=1).astype(np.float64))
    bad = ex > (u[i, None] + VIOLATION_EPS)
    r, c = np.nonzero(bad)
    vr.append(i[r])
    vc.append(ix[r, c])
    vv.append(ex[r, c] + v32[ix[r, c]])

  for lo, hi in _blocks(n, block_size):
    m = hi - lo
    exact, idx, count = certify_block(
        _padded(a, lo, hi, block_size), _padded(a_scr, lo, hi, block_size), b, b_scr, v32,
        np.pad(u32[lo:hi], (0, block_size - m)), delta, k=k)
    exact, idx, count = np.asarray(exact)[:m], np.asarray(idx)[:m], np.asarray(count)[:m]
    ok = count <= k
    take(lo, exact, idx, np.flatnonzero(ok))
    redo.append(lo + np.flatnonzero(~ok))
    if progress is not None:
      progress(m)
  redo = np.concatenate(redo)
  for lo, hi in _blocks(len(redo), block_size):
    rows = redo[lo:hi]
    blk = _padded(a[rows], 0, len(rows), block_size)
    row_max, vals, idx = row_block(blk, b, v32, k=k)
    m = len(rows)
    row_max, vals, idx = np.asarray(row_max)[:m], np.asarray(vals)[:m], np.asarray(idx)[:m]
    u_cert[rows] = np.maximum(u_cert[rows], row_max)
    bad = vals > (u[rows, None] + VIOLATION_EPS)
    r, c = np.nonzero(bad)
    vr.append(rows[r])
    vc.append(idx[r, c])
    vv.append(vals[r, c] + v32[idx[r, c]])
  bound = float(u_cert.sum() + v32.astype(np.float64).sum())
  return Certificate(u=u_cert, bound=bound, rows=np.concatenate(vr).astype(np.int64),
                     cols=np.concatenate(vc).astype(np.int64), vals=np.concatenate(vv),
                     rows_recomputed=len(redo))


def certify_tail(a: np.ndarray, b: np.ndarray, u: np.ndarray, v: np.ndarray,
                 ceiling: np.ndarray, max_entries: int,
                 block_size: int = 1024) -> Certificate | None:
  """The certificate without a pass over the full matrix, from each row's ceiling.

  Every entry off row i's candidate list has c_ij <= ceiling_i, so it already satisfies
  c_ij - v_j <= u_i wherever v_j >= ceiling_i - u_i. Only the columns below that threshold,
  a prefix of the columns sorted by v, can hold a violator. Rows are taken in blocks of
  similar prefix length and each block is one float32 product with its longest prefix: on
  SAE pairs that is under 1% of the matrix, against a full screened pass per round. None when
  the blocks add up to more than `max_entries` entries: then a full pass is cheaper.
  """
  order = np.argsort(v, kind="stable")
  count = np.searchsorted(v[order], ceiling - u, side="left")
  todo = np.flatnonzero(count)
  todo = todo[np.argsort(-count[todo], kind="stable")]  # similar prefixes share a block
  blocks = [todo[lo:hi] for lo, hi in _blocks(len(todo), block_size)]
  if sum(len(r) * int(count[r[0]]) for r in blocks) > max_entries:
    return None
  u_cert = np.asarray(u, np.float64).copy()
  vr, vc, vv = [], [], []
  for rows in blocks:
    cols = order[:count[rows[0]]]
    cos = a[rows] @ b[cols].T
    reduced = cos - v[cols][None, :]
    # Columns past a row's own prefix cannot violate it; the mask only spares the bookkeeping.
    reduced[np.arange(len(cols))[None, :] >= count[rows][:, None]] = -np.inf
    u_cert[rows] = np.maximum(u_cert[rows], reduced.max(axis=1))
    r, c = np.nonzero(reduced > u[rows, None] - NEAR_VIOLATION)
    vr.append(rows[r])
    vc.append(cols[c])
    vv.append(cos[r, c].astype(np.float32))
  cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)
  return Certificate(u=u_cert, bound=float(u_cert.sum() + np.sum(v, dtype=np.float64)),
                     rows=cat(vr, np.int64), cols=cat(vc, np.int64), vals=cat(vv, np.float32),
                     rows_recomputed=0, pairs_checked=int(count.sum()))


def assign_sparse(a: np.ndarray, b: np.ndarray, k: int = 32, col_k: int = 0,
                  certify_k: int = 32, block_size: int = 1024, precision: str = "bfloat16",
                  rel_gap: float = REL_GAP, max_rounds: int = 20, full_passes: bool = False,
                  progress=None) -> Assignment:
  """The exact bijection without the dense matrix, with a dual certificate of optimality.

  k candidates per row. With `certify_tail` a round looks at a fraction of a percent of the
  matrix, so the one full pass, the candidates', sets the cost: at 16,384 on a realistic pair
  (30% orphans) k = 32 took 7.2 s, 16 took 14.1 s (a fourth round, longer prefixes) and 64
  took 9.9 s (a slower top-k), timed in-process while other jobs shared the CPU.
  certify_k: entries per row recomputed exactly in a certificate pass (more: a float32 row).
  full_passes: certify every round with a pass over the full matrix, never `certify_tail`
  (the method before it; for benchmarks).
  """
  t0 = time.perf_counter()
  _check_pair(a, b)
  _check_square(a, b)
  n = a.shape[0]
  rows, cols, vals, best = candidates(a, b, k, col_k, block_size, precision, progress)
  # No entry off a row's top-k list exceeds the list's smallest exact cosine by more than
  # twice the screening error (once to the screened k-th value, once back).
  delta = screen_error(a.shape[1], precision)
  ceiling = (vals[:n * min(k, n)].reshape(n, -1).min(axis=1).astype(np.float64) + 2 * delta
             if k < n else np.full(n, -np.inf))
  # The identity pairing's edges guarantee that the restricted problem has a perfect matching
  # however the candidates cluster; they are rarely chosen.
  ident = np.arange(n)
  rows, cols, vals = _dedupe(np.concatenate([rows, ident]), np.concatenate([cols, ident]),
                             np.concatenate([vals, paired_cosine(a, b)]), n)
  # Edges stay sorted by key = row * n + col, so lookups are binary searches, not hashing.
  key = rows * n + cols
  for round_ in range(1, max_rounds + 1):
    match = solve_sparse(rows, cols, vals, n)
    edge = vals[np.searchsorted(key, np.arange(n) * n + match)].astype(np.float64)
    objective = float(edge.sum())
    u, v = duals(rows, cols, vals, match, n)
    cert = None if full_passes else certify_tail(a, b, u, v, ceiling, max_entries=n * n // 8)
    if cert is None:
      cert = certify(a, b, u, v, k=certify_k, block_size=block_size, precision=precision,
                     progress=progress)
    gap = cert.bound - objective
    # An entry already among the candidates can only "violate" by float32 rounding (two
    # kernels summing in different orders); it adds nothing new to solve.
    new_key = cert.rows * n + cert.cols
    at = np.minimum(np.searchsorted(key, new_key), len(key) - 1)
    new = key[at] != new_key
    if gap <= rel_gap * max(abs(objective), 1.0) or not new.any():
      break
    new_key, first = np.unique(new_key[new], return_index=True)
    order = np.argsort(np.concatenate([key, new_key]), kind="stable")
    key = np.concatenate([key, new_key])[order]
    rows = np.concatenate([rows, cert.rows[new][first]])[order]
    cols = np.concatenate([cols, cert.cols[new][first]])[order]
    vals = np.concatenate([vals, cert.vals[new][first]])[order]
  else:
    raise RuntimeError(f"no certificate after {max_rounds} rounds (gap {gap:.3g}); "
                       "raise the candidate count k")
  return Assignment(cols=match, cos=edge.astype(np.float32), best=best, objective=objective,
                    dual_bound=cert.bound, gap=gap, method="sparse", rounds=round_,
                    num_candidates=len(rows),
                    seconds=time.perf_counter() - t0)


def assign(a: np.ndarray, b: np.ndarray, *, method: str = "auto", dense_max: int = 4096,
           k: int = 32, block_size: int = 1024, precision: str = "bfloat16",
           progress=None) -> Assignment:
  """The optimal bijection of unit rows a to unit rows b: dense up to `dense_max`, else sparse.

  Unequal widths always go dense (the sparse solver and its certificate assume a perfect
  matching): ~12 n_a n_b bytes, 6 GB for 16,384 against 32,768 latents.
  """
  _check_pair(a, b)
  if method == "auto":
    square = a.shape[0] == b.shape[0]
    method = "dense" if a.shape[0] <= dense_max or not square else "sparse"
  if method == "dense":
    return assign_dense(a, b, block_size)
  if method == "sparse":
    _check_square(a, b)
    return assign_sparse(a, b, k=k, block_size=block_size, precision=precision,
                         progress=progress)
  raise JaxsaeError(f"--assignment={method!r}: use auto, dense or sparse")
