"""Which latents do SAEs trained with different seeds share? (Paulo & Belrose 2025.)

  jaxsae match RUN --out=DIR                  every seed of a jaxsae training run
  jaxsae match SAE_A SAE_B [SAE_C ...] --out=DIR   SAE directories (sparsify or SAELens)

For every pair of seeds (a, b), encoder rows and decoder rows are unit-normalised and matched
by the optimal bijection maximising total cosine (see assign.py), separately. A latent of `a`
is **shared** under the headline rule `agree` when both bijections send it to the same latent
of `b` with both cosines >= threshold; else it is an **orphan**. The paper's code used other
rules for some figures, so all are reported side by side:

  agree       same partner in both bijections, both cosines >= threshold (default headline)
  both_above  encoder and decoder partner cosines both >= threshold, partners may differ
  decoder     decoder partner cosine >= threshold
  max_cos     each latent's best encoder and best decoder cosine >= threshold, no bijection

Also per pair the mean matched cosine, PW-MCC (Song et al. 2025, arXiv 2505.20254): the mean
cosine of the optimal decoder (and encoder) bijection, no threshold.

SAEs of different widths can be matched: the optimal one-to-one matching gives every latent of
the narrower SAE a partner, and leaves the rest of the wider one without (partner -1). Such a
pair is listed wider first (`a` the wider), so latents.csv, one row per latent of `a`, holds a
row for every latent of both sides: the wider's directly, the narrower's as partners.
`shared_of_a` and `shared_of_b` say which side a fraction is of (n_shared / n_a, n_shared / n_b);
`fraction_shared` keeps its meaning, the fraction of a's latents.

Writes DIR/latents.csv (one row per latent of `a` per pair), DIR/frequencies.npy ([S, n]
firing frequencies, when an activation store is known; frequencies.npz, one array `sae{i}` per
SAE in match.json's order, when widths differ) and DIR/match.json (the summary).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
from typing import Iterator, Sequence

import numpy as np

from jaxsae import assign as assign_lib
from jaxsae import files
from jaxsae import saes as saes_lib
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

RULES = ("agree", "both_above", "decoder", "max_cos")
LATENTS_FILE = "latents.csv"
SUMMARY_FILE = "match.json"
FREQ_FILE = "frequencies.npy"
FREQ_RAGGED_FILE = "frequencies.npz"  # SAEs of different widths: one array per SAE
DEFAULT_FREQ_TOKENS = 262_144


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  """Flags of `jaxsae match`."""
  inputs: tuple[str, ...] = field((), "a jaxsae run directory (all its seeds), or two or more SAE "
                                  "directories", positional=True)
  out: str = field("", "directory for latents.csv, frequencies.npy and match.json")
  threshold: float = field(0.7, "a matched pair counts as shared when its cosines are >= this, in "
                           "[-1, 1]")
  definition: str = field("agree", f"the headline sharing rule: one of {', '.join(RULES)}")
  block_size: int = field(1024, "rows per block of the cosine kernel; memory is ~4 * block_size * "
                          "n_latents B")
  assignment: str = field("auto", "auto (dense up to --dense_max latents, else sparse), dense "
                          "(scipy on the full matrix) or sparse (candidates + dual certificate)")
  dense_max: int = field(4096, "largest width solved on the dense matrix under --assignment=auto")
  candidates: int = field(32, "top-K cosines per row kept as candidates by the sparse solver")
  precision: str = field("bfloat16", "precision of the sparse solver's full-matrix screening "
                         "passes (bfloat16 or float32); its results are exact float32 cosines "
                         "either way")
  store: str = field("", "activation store for firing frequencies (default: the one the run names)")
  freq_tokens: int = field(-1, "tokens to measure firing frequencies on; -1: "
                           f"{DEFAULT_FREQ_TOKENS} when the SAEs name a store, else none; 0: skip")
  freq_batch: int = field(1024, "tokens per batch of the frequency pass")
  subsets: int = field(200, "random seed subsets per size for the 'found only in the base seed' "
                       "curve")
  seed: int = field(0, "random seed of those subsets")


# ---------------------------------------------------------------------------------------------
# The rules: pure functions of one pair's per-latent columns.


def rule_masks(enc_partner, enc_cos, dec_partner, dec_cos, enc_best, dec_best,
               threshold: float) -> dict[str, np.ndarray]:
  """Shared flags of every latent of `a` under each rule in RULES."""
  enc_ok, dec_ok = enc_cos >= threshold, dec_cos >= threshold
  return {
      "agree": (enc_partner == dec_partner) & enc_ok & dec_ok,
      "both_above": enc_ok & dec_ok,
      "decoder": dec_ok,
      "max_cos": (enc_best >= threshold) & (dec_best >= threshold),
  }


def _stats(x: Sequence[float]) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
          "max": float(x.max())}


def _check(cfg: MatchConfig) -> None:
  if not cfg.out:
    raise JaxsaeError("--out is required: the directory for the match results")
  if not (-1.0 <= cfg.threshold <= 1.0) or math.isnan(cfg.threshold):
    raise JaxsaeError(f"--threshold={cfg.threshold} is not a cosine; use a value in [-1, 1] "
                      "(the paper uses 0.7)")
  if cfg.definition not in RULES:
    raise JaxsaeError(f"--definition={cfg.definition!r}: use one of {', '.join(RULES)}")
  if cfg.assignment not in ("auto", "dense", "sparse"):
    raise JaxsaeError(f"--assignment={cfg.assignment!r}: use auto, dense or sparse")
  if cfg.precision not in ("bfloat16", "float32"):
    raise JaxsaeError(f"--precision={cfg.precision!r}: use bfloat16 or float32")
  if cfg.block_size < 1 or cfg.candidates < 1 or cfg.freq_batch < 1:
    raise JaxsaeError("--block_size, --candidates and --freq_batch must be positive")


# ---------------------------------------------------------------------------------------------
# Firing frequencies.


def token_sample(store, num_tokens: int, batch_size: int = 1024,
                 site: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """The tokens firing frequencies are measured on, and report's contexts are drawn from.

  They are the first `num_tokens` (at most one epoch) of the store's deterministic batch
  stream, as the trainer reads it (data seed 0), raw: each SAE applies its own input scale.
  Yields (x [batch_size, d_in], rows [batch_size] their global store rows, take): only the
  first `take` rows of the last batch belong to the sample; it is padded, not cut, so that
  one compiled step serves every batch. The stream's order does not depend on batch_size.
  """
  num_tokens = min(num_tokens, store.num_tokens)
  for step in range(-(-num_tokens // batch_size)):
    take = min(batch_size, num_tokens - step * batch_size)
    yield (store.batch(step, batch_size, site=site), store.batch_indices(step, batch_size),
           take)


def frequencies(saes: Sequence[saes_lib.SAE], store, num_tokens: int, batch_size: int = 1024,
                site: str | None = None, progress: bool = True) -> tuple[np.ndarray, int]:
  """Fraction of `num_tokens` store tokens (`token_sample`) on which each latent of each SAE
  fires: [S, n] (a list of [n_s] arrays when the widths differ), and the number of tokens.

  All seeds of one architecture go through one jitted step per batch (a `lax.map` over the
  seed axis keeps memory at one [batch, n] activation block).
  """
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  num_tokens = min(num_tokens, store.num_tokens)
  # SAEs whose modules have one graph (architecture, k, b_dec rule) and width share one program.
  groups: dict = {}
  for i, s in enumerate(saes):
    graphdef, state = saes_lib.encoder(s)
    groups.setdefault((graphdef, s.n_latents), []).append((i, state, np.float32(s.input_scale)))
  graphdefs = tuple(g for g, _ in groups)  # static: each group's firing rule is in the program
  stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[(st, sc) for _, st, sc in members])
             for members in groups.values()]

  @functools.partial(jax.jit, static_argnums=0)
  def count(graphdefs, stacked, x, valid):
    def fires(graphdef, state, scale):
      z = saes_lib.encode(graphdef, state, x, scale)
      return ((z > 0) & valid[:, None]).sum(0, dtype=jnp.int32)
    return [jax.lax.map(lambda a, g=g: fires(g, *a), group)
            for g, group in zip(graphdefs, stacked)]

  totals = [np.zeros(s.n_latents, np.int64) for s in saes]
  bar = tqdm(total=num_tokens, desc="frequencies", unit="tok", disable=not progress)
  for x, _, take in token_sample(store, num_tokens, batch_size, site):
    counts = count(graphdefs, stacked, x, np.arange(batch_size) < take)
    for members, c in zip(groups.values(), counts):
      for (i, _, _), row in zip(members, np.asarray(c)):
        totals[i] += row
    bar.update(take)
  bar.close()
  freqs = [t / num_tokens for t in totals]
  same = len({len(f) for f in freqs}) == 1
  return (np.stack(freqs) if same else freqs), num_tokens


# ---------------------------------------------------------------------------------------------
# Pairs and seeds.


def match_pair(a: saes_lib.CanonicalSAE, b: saes_lib.CanonicalSAE, cfg: MatchConfig,
               progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
  """Matches the latents of `a` to those of `b`: the pair's summary and per-latent columns.

  For unequal widths a latent of `a` may have no partner (-1, cosine NaN): it is an orphan
  under every rule but max_cos, which needs no partner.
  """
  from tqdm import tqdm
  kw = dict(method=cfg.assignment, dense_max=cfg.dense_max, k=cfg.candidates,
            block_size=cfg.block_size, precision=cfg.precision)
  found = {}
  for side, key in (("encoder", "W_enc"), ("decoder", "W_dec")):
    # Rows through the full-matrix passes: a pass is n rows, and the sparse path makes 2-4.
    with tqdm(desc=f"{a.name}-{b.name} {side}", unit="row", leave=False,
              disable=not progress or a.n_latents <= cfg.dense_max) as bar:
      found[side] = assign_lib.assign(assign_lib.unit_rows(getattr(a, key)),
                                      assign_lib.unit_rows(getattr(b, key)),
                                      progress=bar.update, **kw)
  enc, dec = found["encoder"], found["decoder"]
  cols = {
      "latent": np.arange(a.n_latents),
      "enc_partner": enc.cols, "enc_cos": enc.cos, "enc_best": enc.best,
      "dec_partner": dec.cols, "dec_cos": dec.cos, "dec_best": dec.best,
      "agree": (enc.cols == dec.cols) & (enc.cols >= 0),
  }
  masks = rule_masks(enc.cols, enc.cos, dec.cols, dec.cos, enc.best, dec.best, cfg.threshold)
  for rule, m in masks.items():
    cols[f"shared_{rule}"] = m
  n_a, n_b = a.n_latents, b.n_latents
  shared = cols["shared"] = masks[cfg.definition]
  summary = {
      "a": a.name, "b": b.name, "n_latents": n_a, "n_a": n_a, "n_b": n_b,
      "n_shared": int(shared.sum()), "fraction_shared": float(shared.mean()),
      # Which side a fraction is of: each shared latent of a has its own partner in b.
      "shared_of_a": float(shared.sum() / n_a), "shared_of_b": float(shared.sum() / n_b),
      "fraction_agree": float(cols["agree"].mean()),
      "rules": {r: {"n_shared": int(m.sum()), "fraction_shared": float(m.mean())}
                for r, m in masks.items()},
  }
  for side, res in (("encoder", enc), ("decoder", dec)):
    # PW-MCC: the mean cosine of the optimal matching, over its min(n_a, n_b) pairs.
    summary[f"{side}_mcc"] = res.objective / min(n_a, n_b)
    summary[f"{side}_objective"] = res.objective
    summary[f"{side}_dual_bound"] = res.dual_bound
    summary[f"{side}_gap"] = res.gap
    summary[f"{side}_method"] = res.method
    summary[f"{side}_seconds"] = round(res.seconds, 3)
    summary[f"{side}_rounds"] = res.rounds
  return summary, cols


def seed_statistics(shared_with_base: np.ndarray, subsets: int, seed: int = 0) -> dict:
  """The paper's multi-seed view from the base seed's shared flags against every other seed.

  Args:
    shared_with_base: [S-1, n] bool, latent i of the base seed is shared with seed s.
  """
  others, n = shared_with_base.shape
  s_total = others + 1
  found_in = 1 + shared_with_base.sum(0)
  rng = np.random.default_rng(seed)
  only_base = []
  for m in range(1, s_total + 1):  # m SAEs compared, the base among them
    if m == 1:
      only_base.append({"num_saes": 1, "mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0,
                        "num_subsets": 1})
      continue
    combos = math.comb(others, m - 1)
    if combos <= subsets:
      picks = [list(c) for c in itertools.combinations(range(others), m - 1)]
    else:
      picks = [rng.choice(others, m - 1, replace=False) for _ in range(subsets)]
    fr = [float((~shared_with_base[p].any(0)).mean()) for p in picks]
    only_base.append({"num_saes": m, **_stats(fr), "num_subsets": len(picks)})
  return {
      "num_saes": s_total,
      "found_in_counts": {str(c): int((found_in == c).sum()) for c in range(1, s_total + 1)},
      "fraction_only_base": only_base,
      "fraction_shared_by_all": float((found_in == s_total).mean()),
  }


def oriented_pairs(saes: Sequence[saes_lib.CanonicalSAE]) -> list[tuple[int, int]]:
  """Every pair (i, j), i before j, but the wider SAE first when the widths differ, so that
  the per-latent rows of `a` cover every latent left without a partner."""
  return [(j, i) if saes[j].n_latents > saes[i].n_latents else (i, j)
          for i, j in itertools.combinations(range(len(saes)), 2)]


def flags_of(base: int, pair: tuple[int, int], shared: np.ndarray, dec_partner: np.ndarray,
             n_base: int) -> np.ndarray:
  """Shared flags of the latents of SAE `base` in `pair`, from the flags of a's latents: as
  they are when base is a, else carried to the decoder partners (exact for the rules with one
  partner, agree and decoder)."""
  if pair[0] == base:
    return shared
  out = np.zeros(n_base, bool)
  out[dec_partner[shared & (dec_partner >= 0)]] = True
  return out


def _write_latents(path: str, rows: list[dict[str, np.ndarray]]) -> None:
  import pandas as pd
  tmp = path + ".tmp"
  pd.concat([pd.DataFrame(r) for r in rows], ignore_index=True).to_csv(
      tmp, index=False, float_format="%.7g")
  os.replace(tmp, path)


def run(cfg: MatchConfig) -> dict:
  """Matches every pair of the given SAEs and writes the results to cfg.out."""
  from tqdm import tqdm
  from jaxsae import store as store_lib

  _check(cfg)
  t0 = time.time()
  saes = saes_lib.load_all(cfg.inputs, same_width=False)
  names = [s.name for s in saes]
  n = saes[0].n_latents

  store_path = cfg.store or saes_lib.find_store(cfg.inputs, saes)
  freq_tokens = cfg.freq_tokens
  if freq_tokens < 0:
    freq_tokens = DEFAULT_FREQ_TOKENS if store_path else 0
  freqs = None
  if freq_tokens > 0:
    if not store_path:
      raise JaxsaeError(
          f"--freq_tokens={freq_tokens} needs an activation store, but {', '.join(cfg.inputs)} "
          "name none (no 'store' in a run's run.json or an SAE's cfg.json); pass --store=DIR or "
          "--freq_tokens=0")
    store = store_lib.Store(store_path, expect_d_in=saes[0].d_in)
    site = saes[0].site if saes[0].site in store.sites else None
    freqs, freq_tokens = frequencies(saes, store, freq_tokens, cfg.freq_batch, site=site)

  os.makedirs(cfg.out, exist_ok=True)
  # match.json marks a complete result: an old one must not vouch for files rewritten now.
  if os.path.exists(os.path.join(cfg.out, SUMMARY_FILE)):
    os.remove(os.path.join(cfg.out, SUMMARY_FILE))
  pairs, tables, with_base = [], [], {}
  for i, j in tqdm(oriented_pairs(saes), desc="pairs", unit="pair"):
    summary, cols = match_pair(saes[i], saes[j], cfg)
    pairs.append(summary)
    if 0 in (i, j):
      with_base[i + j] = flags_of(0, (i, j), cols[f"shared_{cfg.definition}"],
                                  cols["dec_partner"], n)
    n_a = saes[i].n_latents
    table = {"a": np.full(n_a, names[i]), "b": np.full(n_a, names[j]), **cols}
    if freqs is not None:
      partner = cols["dec_partner"]
      table["frequency"] = freqs[i]
      table["partner_frequency"] = np.where(partner >= 0, freqs[j][partner], np.nan)
    tables.append(table)

  fr = [p["fraction_shared"] for p in pairs]
  mcc = {f"{side}_mcc_{k}": v for side in ("decoder", "encoder")
         for k, v in _stats([p[f"{side}_mcc"] for p in pairs]).items()}
  result = {
      "threshold": cfg.threshold,
      "definition": cfg.definition,
      "fraction_shared_mean": float(np.mean(fr)),
      "fraction_shared_std": float(np.std(fr)),
      "fraction_shared_min": float(np.min(fr)),
      "fraction_shared_max": float(np.max(fr)),
      "fraction_agree_mean": float(np.mean([p["fraction_agree"] for p in pairs])),
      "rules": {r: _stats([p["rules"][r]["fraction_shared"] for p in pairs]) for r in RULES},
      **mcc,
      "n_latents": n,
      "d_in": saes[0].d_in,
      "saes": [{"name": s.name, "path": os.path.abspath(s.path), "layout": s.layout,
                "arch": s.arch, "k": s.k, "n_latents": s.n_latents} for s in saes],
      "store": os.path.abspath(store_path) if store_path and "://" not in store_path
               else store_path,
      "freq_tokens": freq_tokens if freqs is not None else 0,
      "seeds": seed_statistics(np.stack([with_base[j] for j in range(1, len(saes))]),
                               cfg.subsets, cfg.seed),
      "pairs": pairs,
      "config": dataclasses.asdict(cfg),
      "seconds": round(time.time() - t0, 2),
  }
  _write_latents(os.path.join(cfg.out, LATENTS_FILE), tables)
  if isinstance(freqs, np.ndarray):
    np.save(os.path.join(cfg.out, FREQ_FILE), freqs)
  elif freqs is not None:
    np.savez(os.path.join(cfg.out, FREQ_RAGGED_FILE), **{f"sae{i}": f for i, f in enumerate(freqs)})
  # Last: match.json says the match is complete.
  files.atomic_write_json(os.path.join(cfg.out, SUMMARY_FILE), result)
  widths = "/".join(str(w) for w in sorted({s.n_latents for s in saes}))
  print(f"jaxsae match: {len(pairs)} pairs of {len(saes)} SAEs x {widths} latents: "
        f"{result['fraction_shared_mean']:.3f} shared ({cfg.definition}, threshold "
        f"{cfg.threshold}), decoder PW-MCC {result['decoder_mcc_mean']:.3f}; wrote "
        f"{cfg.out}/{SUMMARY_FILE}")
  return result
