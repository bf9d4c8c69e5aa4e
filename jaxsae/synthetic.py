"""Activations with known features: an ordinary activation store whose true dictionary is known.

  jaxsae synth --out=DIR [--d_in=64 --num_features=512 --l0=8 --hierarchy=16 --correlation=0.3]

Every token is a sum of unit feature directions with positive magnitudes, x = sum_i a_i f_i
(+ optional isotropic noise). Feature i fires with probability p_i, Zipf-distributed over the
features' rank (p_i proportional to (i + 1)^-zipf_exponent, scaled so that the expected number
of active features, the true L0, is --l0), the layout SynthSAEBench (arXiv 2602.14687) uses. Its
optional structure:

  superposition  --num_features > --d_in: random unit directions, necessarily not orthogonal
                 (up to d_in features are drawn orthonormal)
  hierarchy      --hierarchy=H parents among the most frequent features, each with
                 --branching children drawn from the rest; a child fires only when its parent
                 does, and at most one child of a parent fires (the setting in which a latent
                 can absorb its parent's direction, Chanin et al. 2024)
  correlation    --correlation=c: firing follows a Gaussian copula whose correlation matrix is
                 c times a random rank-`correlation_rank` one (plus 1 - c on the diagonal); the
                 marginals p_i are unchanged

DIR is a store every command reads (`jaxsae train --store=DIR`); its manifest says
`"model": "synthetic"` and records every parameter and the seed under "synthetic". Beside it:
DIR/truth/, the true dictionary as a TopK SAE (encoder and decoder rows are the features, k the
rounded true L0) that `jaxsae match` and `jaxsae truth` read, and DIR/synthetic.npz
(`probability` [N] the marginal firing probability of each feature, `parent` [N], -1 for none).
The same flags and seed write the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time

import numpy as np

from jaxsae import files
from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

SITE = "synthetic"
TRUTH_DIR = "truth"
ARRAYS_FILE = "synthetic.npz"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Flags of `jaxsae synth`."""
  out: str = field("", "Directory of the store to write; the true dictionary goes to OUT/truth.")
  d_in: int = field(64, "Dimension of the activations.")
  num_features: int = field(512, "True features N; N > d_in puts them in superposition.")
  num_tokens: int = field(262_144, "Tokens (rows) to write.")
  l0: float = field(8.0, "Expected number of active features per token (the true L0).")
  zipf_exponent: float = field(0.5, "p_i is proportional to (rank + 1)^-exponent (SynthSAEBench: "
                               "0.5).")
  magnitude_mean: float = field(1.0, "Mean of an active feature's magnitude.")
  magnitude_std: float = field(0.5, "Spread of the magnitudes (a normal folded at 0, so every "
                               "magnitude is positive).")
  hierarchy: int = field(0, "Parent features (0: none); each gets --branching children that fire "
                         "only with it, one at a time.")
  branching: int = field(4, "Children per parent under --hierarchy.")
  correlation: float = field(0.0, "Strength c in [0, 1) of correlated firing (0: independent).")
  correlation_rank: int = field(8, "Rank of the copula's correlation under --correlation.")
  noise_std: float = field(0.0, "Isotropic Gaussian noise added to every row, per dimension.")
  seed: int = field(0, "Seed of the features, the firing probabilities and every token.")
  rows_per_shard: int = field(16_384, "Rows per shard (and per generated chunk).")
  dtype: str = field("float32", "Store dtype (float32 keeps the sums exact).")


def _check(cfg: SynthConfig) -> None:
  if not cfg.out:
    raise JaxsaeError("--out is required: the directory of the synthetic store")
  if min(cfg.d_in, cfg.num_features, cfg.num_tokens, cfg.rows_per_shard) < 1:
    raise JaxsaeError("--d_in, --num_features, --num_tokens and --rows_per_shard must be "
                      "positive")
  if not 0 < cfg.l0 <= cfg.num_features:
    raise JaxsaeError(f"--l0={cfg.l0}: the true L0 must be in (0, --num_features]")
  if not 0 <= cfg.correlation < 1:
    raise JaxsaeError(f"--correlation={cfg.correlation}: use a strength in [0, 1)")
  if cfg.hierarchy < 0 or cfg.hierarchy * (1 + cfg.branching) > cfg.num_features:
    raise JaxsaeError(f"--hierarchy={cfg.hierarchy} with --branching={cfg.branching} needs "
                      f"{cfg.hierarchy * (1 + cfg.branching)} features, more than "
                      f"--num_features={cfg.num_features}; lower either or raise N")
  if cfg.magnitude_mean <= 0 or cfg.magnitude_std < 0 or cfg.noise_std < 0:
    raise JaxsaeError("--magnitude_mean must be positive, --magnitude_std and --noise_std 0 or "
                      "more")


def features(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """[n, d] unit directions: orthonormal while n <= d, else random (in superposition)."""
  if n <= d:
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))
    return np.ascontiguousarray(q.T)
  f = rng.standard_normal((n, d))
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def zipf_probabilities(n: int, l0: float, exponent: float) -> np.ndarray:
  p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
  p *= l0 / p.sum()
  if p[0] > 1:
    raise JaxsaeError(f"--l0={l0} over {n} features at --zipf_exponent={exponent} would make the "
                      f"most frequent feature fire with probability {p[0]:.2f} > 1; lower --l0 "
                      "or the exponent, or raise --num_features")
  return p


@dataclasses.dataclass(frozen=True)
class Truth:
  """What the generator draws once from the seed: the dictionary and how each feature fires."""
  directions: np.ndarray  # [N, d] unit rows
  probability: np.ndarray  # [N] marginal firing probability
  parent: np.ndarray  # [N] int, -1 where a feature fires on its own
  conditional: np.ndarray  # [N] a child's probability given its parent fired (else = marginal)
  loadings: np.ndarray | None  # [N, rank] copula factor loadings, None when independent

  @property
  def l0(self) -> float:
    return float(self.probability.sum())


def draw_truth(cfg: SynthConfig) -> Truth:
  rng = np.random.default_rng([cfg.seed, 0])
  n = cfg.num_features
  dirs = features(cfg.d_in, n, rng)
  p = zipf_probabilities(n, cfg.l0, cfg.zipf_exponent)
  parent = np.full(n, -1, np.int64)
  cond = p.copy()
  if cfg.hierarchy:
    # Parents are the most frequent features; children are drawn from the rest, so that a
    # child is rarer than its parent as it must be, and the Zipf ranks stay unpermuted.
    rest = rng.permutation(np.arange(cfg.hierarchy, n))
    for h in range(cfg.hierarchy):
      kids = rest[h * cfg.branching:(h + 1) * cfg.branching]
      parent[kids] = h
      c = p[kids] / p[h]
      cond[kids] = c / max(1.0, c.sum())  # mutually exclusive: at most one child at a time
      p[kids] = p[h] * cond[kids]
  loadings = None
  if cfg.correlation > 0:
    g = rng.standard_normal((n, cfg.correlation_rank))
    loadings = np.sqrt(cfg.correlation) * g / np.linalg.norm(g, axis=1, keepdims=True)
  return Truth(dirs, p, parent, cond, loadings)


def _fires(truth: Truth, rows: int, rng: np.random.Generator) -> np.ndarray:
  """[rows, N] bool: which features fire on each row."""
  from scipy.special import ndtri
  n = len(truth.probability)
  root = truth.parent < 0
  q = np.where(root, truth.probability, 0.0)
  if truth.loadings is None:
    on = rng.random((rows, n)) < q
  else:
    # Gaussian copula: z_i is standard normal for every i, so P(z_i < ndtri(q_i)) = q_i.
    c = (truth.loadings ** 2).sum(axis=1)
    z = rng.standard_normal((rows, truth.loadings.shape[1])) @ truth.loadings.T
    z += np.sqrt(1 - c) * rng.standard_normal((rows, n))
    with np.errstate(divide="ignore"):
      on = z < ndtri(q)
  for h in np.unique(truth.parent[~root]):
    kids = np.nonzero(truth.parent == h)[0]
    # One draw per row picks at most one child: child j with probability conditional[j].
    edges = np.cumsum(truth.conditional[kids])
    pick = np.searchsorted(edges, rng.random(rows), side="right")
    chosen = (pick[:, None] == np.arange(len(kids))[None, :]) & on[:, h:h + 1]
    on[:, kids] = chosen
  return on


def chunk(cfg: SynthConfig, truth: Truth, index: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(x [rows, d] float32, fires [rows, N] bool) of chunk `index`: its own stream of the seed."""
  rng = np.random.default_rng([cfg.seed, 1, index])
  on = _fires(truth, rows, rng)
  mag = np.abs(cfg.magnitude_mean + cfg.magnitude_std * rng.standard_normal(on.shape))
  x = (on * mag) @ truth.directions
  if cfg.noise_std:
    x += cfg.noise_std * rng.standard_normal(x.shape)
  return x.astype(np.float32), on


def params(cfg: SynthConfig) -> dict:
  """The manifest's record of the generator: every flag but where it was written."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "dtype")}


def save_truth(directory: str, truth: Truth, store_dir: str) -> None:
  from jaxsae.formats import sparsify
  d = truth.directions.astype(np.float32)
  # Encoder rows equal to the decoder's: with orthonormal features this TopK encodes exactly.
  sparsify.write(directory, {"W_enc": d.T, "b_enc": np.zeros(len(d), np.float32),
                             "W_dec": d, "b_dec": np.zeros(d.shape[1], np.float32)},
                 {"arch": "topk", "k": max(1, int(round(truth.l0))), "synthetic": True,
                  "store": os.path.abspath(store_dir), "site": SITE})


def run(cfg: SynthConfig) -> store_lib.Store:
  """Writes the store, OUT/truth and OUT/synthetic.npz; a finished one is left as it is."""
  _check(cfg)
  t0 = time.time()
  truth = draw_truth(cfg)
  num_shards = -(-cfg.num_tokens // cfg.rows_per_shard)
  record = {**params(cfg), "true_l0": truth.l0, "p_max": float(truth.probability.max()),
            "p_min": float(truth.probability.min()), "truth": TRUTH_DIR,
            "arrays": ARRAYS_FILE}
  store_writer.init_store(cfg.out, {
      "model": "synthetic", "synthetic": record, "sites": [SITE], "d_in": cfg.d_in,
      "dtype": cfg.dtype, "ctx_len": 1, "num_shards": num_shards,
      "windows_per_shard": cfg.rows_per_shard, "excluded_tokens": [], "tokenizer": None})
  done = store_lib.written_shards(cfg.out)
  for i in range(num_shards):
    rows = min(cfg.rows_per_shard, cfg.num_tokens - i * cfg.rows_per_shard)
    if i in done:
      continue
    x, _ = chunk(cfg, truth, i, rows)
    store_writer.write_shard(cfg.out, i, x[:, None, :], np.zeros((rows, 1), np.int32),
                             np.arange(rows))
  buf = io.BytesIO()
  np.savez(buf, probability=truth.probability, parent=truth.parent,
           conditional=truth.conditional)
  files.atomic_write_bytes(os.path.join(cfg.out, ARRAYS_FILE), buf.getvalue())
  save_truth(os.path.join(cfg.out, TRUTH_DIR), truth, cfg.out)
  store_writer.finalize(cfg.out)
  print(f"jaxsae synth: {cfg.num_tokens:,} tokens of {cfg.num_features} features in "
        f"{cfg.d_in} dimensions (true L0 {truth.l0:.2f}, p {truth.probability.min():.2g}.."
        f"{truth.probability.max():.2g}) -> {cfg.out} in {time.time() - t0:.1f} s; true "
        f"dictionary: {os.path.join(cfg.out, TRUTH_DIR)}")
  return store_lib.Store(cfg.out)


def load_arrays(store_dir: str) -> dict[str, np.ndarray]:
  """synthetic.npz of a synthetic store: per feature its probability, parent, conditional."""
  path = os.path.join(store_dir, ARRAYS_FILE)
  if not os.path.exists(path):
    raise JaxsaeError(f"{store_dir} has no {ARRAYS_FILE}: it is not a synthetic store (write one "
                      "with jaxsae synth --out=DIR)")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}
