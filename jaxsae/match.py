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

Match is the stage that reads the store and encodes: one pass over a token sample, each SAE
encoding each batch once, measures what the report shows, so that the report renders from DIR
alone. Writes DIR/latents.csv (one row per latent of `a` per pair), DIR/frequencies.npy ([S, n]
firing frequencies, when an activation store is known; frequencies.npz, one array `sae{i}` per
SAE in match.json's order, when widths differ), DIR/importance.npz (the FVU each latent's
ablation adds), DIR/contexts.npz and DIR/tokens.json (every latent's top-activating contexts,
their token windows and display strings), DIR/stability.csv (every latent of every SAE: in how
many other seeds it is shared, its mean matched cosines, its group across all seeds; see
stability.py) and DIR/match.json (the summary, written last). The formats are in README.md,
"Matching".
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import time
from typing import Iterator, Sequence

import numpy as np

from jaxsae import assign as assign_lib
from jaxsae import files
from jaxsae import gguf_reading
from jaxsae import formats
from jaxsae import saes as saes_lib
from jaxsae import stability as stability_lib
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

RULES = ("agree", "both_above", "decoder", "max_cos")
LATENTS_FILE = "latents.csv"
SUMMARY_FILE = "match.json"
FREQ_FILE = "frequencies.npy"
FREQ_RAGGED_FILE = "frequencies.npz"  # SAEs of different widths: one array per SAE
IMPORTANCE_FILE = "importance.npz"
CONTEXTS_FILE = "contexts.npz"
TOKENS_FILE = "tokens.json"  # the display string of every token id in contexts.npz
MEASURED_FILES = (FREQ_FILE, FREQ_RAGGED_FILE, IMPORTANCE_FILE, CONTEXTS_FILE, TOKENS_FILE)
STABILITY_FILE = stability_lib.STABILITY_FILE
DEFAULT_FREQ_TOKENS = 262_144


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  """Flags of `jaxsae match`."""
  inputs: tuple[str, ...] = field((), "a jaxsae run directory (all its seeds), or two or more SAE "
                                  "directories", positional=True)
  out: str = field("", "directory for latents.csv, frequencies.npy and match.json")
  threshold: float = field(0.7, "a matched pair counts as shared when its cosines are >= this, in "
                           "[-1, 1]")
  strict: bool = field(False, "a cosine counts only when > --threshold, not >= it: the paper's "
                       "notebook's rule (cosine > 0.7)")
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
  freq_batch: int = field(1024, "tokens per batch of the pass over the token sample")
  importance_tokens: int = field(-1, "tokens the importance of every latent (the FVU its "
                                 "ablation adds) is measured on: -1, the --freq_tokens sample; "
                                 "N, the first N of that same sample; 0, none")
  scan_tokens: int = field(-1, "tokens scanned for every latent's top-activating contexts: -1, "
                           "the --freq_tokens sample; N, the first N of that same sample; 0, "
                           "no contexts")
  contexts: int = field(5, "top-activating contexts kept per latent of every SAE")
  before: int = field(12, "tokens of context kept before the activating token")
  after: int = field(3, "tokens of context kept after the activating token")
  subsets: int = field(200, "random seed subsets per size for the 'found only in the base seed' "
                       "curve")
  seed: int = field(0, "random seed of those subsets")


# ---------------------------------------------------------------------------------------------
# The rules: pure functions of one pair's per-latent columns.


def rule_masks(enc_partner, enc_cos, dec_partner, dec_cos, enc_best, dec_best,
               threshold: float, strict: bool = False) -> dict[str, np.ndarray]:
  """Shared flags of every latent of `a` under each rule in RULES (`strict`: cosines > the
  threshold, else >=)."""
  above = np.greater if strict else np.greater_equal
  enc_ok, dec_ok = above(enc_cos, threshold), above(dec_cos, threshold)
  return {
      "agree": (enc_partner == dec_partner) & enc_ok & dec_ok,
      "both_above": enc_ok & dec_ok,
      "decoder": dec_ok,
      "max_cos": above(enc_best, threshold) & above(dec_best, threshold),
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
  if min(cfg.contexts, cfg.before, cfg.after) < 0:
    raise JaxsaeError("--contexts, --before and --after must be 0 or more")


# ---------------------------------------------------------------------------------------------
# The pass over the token sample: firing frequencies, importance, top contexts.


def token_sample(store, num_tokens: int, batch_size: int = 1024,
                 site: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """The tokens every latent is measured on: firing frequencies, importance, top contexts.

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


@dataclasses.dataclass(frozen=True)
class Measured:
  """What one pass over the token sample measured, one entry per SAE (None: not measured).

  frequencies: [n] fraction of the first `freq_tokens` tokens each latent fires on.
  importance: [n] the FVU each latent's ablation alone adds, on the first `importance_tokens`;
    fvu: each SAE's FVU there.
  top_activation, top_position, top_row: [n, top] each latent's largest activations on the
    first `scan_tokens`, descending (ties: the token met first), their positions in the sample
    and their store rows; past the last positive one, 0 and -1.
  """
  freq_tokens: int
  importance_tokens: int
  scan_tokens: int
  frequencies: list[np.ndarray] | None
  importance: list[np.ndarray] | None
  fvu: list[float] | None
  top_activation: list[np.ndarray] | None
  top_position: list[np.ndarray] | None
  top_row: list[np.ndarray] | None


def error_sums(m, x_in, z, shift, w) -> tuple[object, dict]:
  """The error e = x - decode(z) of the rows `w` weights (1 or 0, [batch, 1]), and one batch's
  sums an FVU over a sample adds up: squared error, and the input's sums centred on `shift`
  (a first-batch mean, so that the variance is not a difference of large sums; see
  `total_variance`). Traced inside a jitted step; shared by the match and the consensus."""
  import jax.numpy as jnp
  e = (x_in - m.decode(z)) * w
  xc = (x_in - shift) * w
  return e, {"sse": jnp.sum(jnp.square(e)), "sx": xc.sum(0), "sq": jnp.sum(jnp.square(xc))}


def total_variance(sx: np.ndarray, sq: float, num_tokens: int) -> float:
  """sum_t |x_t - mean(x)|^2 of a sample from its `error_sums`, summed in float64."""
  return sq - float(sx @ sx) / num_tokens


def _pass_step(graphdefs, what, stacked, best, x, pos, counts):
  """One batch through every SAE: per group of SAEs sharing a program, a `lax.map` over its
  seeds (memory stays at one [batch, n] activation block), each encoding the batch once.

  `what` (static): (frequencies?, importance?, top contexts kept per latent or 0). `counts`:
  the tokens of the sample each measurement covers; a row counts where its position is below.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  freq, imp, top = what
  in_freq, in_imp, in_scan = (pos < c for c in counts)

  def one(graphdef, state, scale, shift, best_v, best_p):
    m = nnx.merge(graphdef, state)
    x_in = saes_lib.sae_input(m, x, scale)
    z = m.encode(x_in)
    out = {}
    if freq:
      out["fires"] = ((z > 0) & in_freq[:, None]).sum(0, dtype=jnp.int32)
    if imp:
      # Zeroing latent i adds z_i W_dec[i] to the error e = x - decode(z) (every architecture
      # decodes linearly, the other codes do not move), so its added squared error is
      # sum_t 2 z_ti <e_t, W_dec[i]> + z_ti^2 |W_dec[i]|^2: one product, no re-encoding.
      w = in_imp[:, None].astype(jnp.float32)
      e, sums = error_sums(m, x_in, z, shift, w)
      zw = z * w
      w_dec = m.W_dec[...]
      g = jnp.dot(e, w_dec.T, precision=jax.lax.Precision.HIGHEST)  # [batch, n] <e_t, W_dec[i]>
      out["d_sse"] = jnp.sum(2 * zw * g + jnp.square(zw) * jnp.sum(jnp.square(w_dec), 1), 0)
      out.update(sums)
    if top:
      # top_k puts the lower index first among equals: the running best (earlier tokens)
      # before this batch's, and within a batch the earlier row.
      v, i = jax.lax.top_k(jnp.where(in_scan[:, None], z, -jnp.inf).T, min(top, len(pos)))
      v, j = jax.lax.top_k(jnp.concatenate([best_v, v], 1), top)
      out["best_v"] = v
      out["best_p"] = jnp.take_along_axis(jnp.concatenate([best_p, pos[i]], 1), j, 1)
    return out

  return [jax.lax.map(lambda a, g=g: one(g, *a), (*group, *b))
          for g, group, b in zip(graphdefs, stacked, best)]


def measure(saes: Sequence[formats.CanonicalSAE], store, freq_tokens: int,
            importance_tokens: int = 0, scan_tokens: int = 0, top: int = 0, batch_size: int = 1024,
            site: str | None = None, progress: bool = True) -> Measured:
  """Firing frequencies, importance and top contexts of every latent of every SAE, from one
  pass over the first max(freq_tokens, importance_tokens, scan_tokens) tokens of
  `token_sample` (each measurement on its own first N; 0 skips it), each SAE encoding each
  batch once.

  Importance is the FVU the ablation adds: the added squared error over the sample's total
  variance sum_t |x_t - mean(x)|^2, as the trainer's FVU (sae/common.py), in the SAE's own
  input scale.
  """
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  counts = [min(c, store.num_tokens) for c in (freq_tokens, importance_tokens, scan_tokens)]
  if counts[2] == 0:
    top = 0
  what = (counts[0] > 0, counts[1] > 0, top)
  total = max(counts)
  # SAEs whose modules have one graph (architecture, k, b_dec rule) and width share one program.
  groups: dict = {}
  for i, s in enumerate(saes):
    graphdef, state = saes_lib.encoder(s)
    groups.setdefault((graphdef, s.n_latents), []).append((i, state, np.float32(s.input_scale)))
  graphdefs = tuple(g for g, _ in groups)  # static: each group's firing rule is in the program
  members = list(groups.values())
  best = [(jnp.full((len(m), n, top), -jnp.inf), jnp.full((len(m), n, top), -1, jnp.int32))
          for (_, n), m in groups.items()]
  step = jax.jit(_pass_step, static_argnums=(0, 1))

  fires = [np.zeros(s.n_latents, np.int64) for s in saes]
  acc = [[np.zeros(s.n_latents), 0.0, np.zeros(s.d_in), 0.0] for s in saes]
  stacked, sample_rows = None, []
  bar = tqdm(total=total, desc="sample", unit="tok", disable=not progress)
  for b, (x, rows, take) in enumerate(token_sample(store, total, batch_size, site)):
    if stacked is None:
      # The variance's shift: the first batch's mean of the importance tokens, in each
      # SAE's input scale.
      mean = x[:min(batch_size, max(counts[1], 1))].astype(np.float64).mean(0).astype(np.float32)
      stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[(st, sc, sc * mean)
                                                           for _, st, sc in m]) for m in members]
    if b * batch_size < counts[2]:
      sample_rows.append(rows[:take])
    pos = b * batch_size + np.arange(batch_size, dtype=np.int32)
    outs = step(graphdefs, what, stacked, best, x, pos, tuple(np.int32(c) for c in counts))
    if top:
      best = [(o["best_v"], o["best_p"]) for o in outs]
    for m, o in zip(members, outs):
      o = {k: np.asarray(v) for k, v in o.items() if k in ("fires", "d_sse", "sse", "sx", "sq")}
      for r, (i, _, _) in enumerate(m):
        if what[0]:
          fires[i] += o["fires"][r]
        if what[1]:
          for k, key in enumerate(("d_sse", "sse", "sx", "sq")):
            acc[i][k] = acc[i][k] + np.asarray(o[key][r], np.float64)
    bar.update(take)
  bar.close()

  out = dict(frequencies=None, importance=None, fvu=None, top_activation=None,
             top_position=None, top_row=None)
  if what[0]:
    out["frequencies"] = [f / counts[0] for f in fires]
  if what[1]:
    total_var = [total_variance(sx, sq, counts[1]) for _, _, sx, sq in acc]
    out["importance"] = [a[0] / v for a, v in zip(acc, total_var)]
    out["fvu"] = [float(a[1] / v) for a, v in zip(acc, total_var)]
  if top:
    sample_rows = np.concatenate(sample_rows)
    acts, positions = [None] * len(saes), [None] * len(saes)
    for m, (v, p) in zip(members, best):
      for r, (i, _, _) in enumerate(m):
        v_i, p_i = np.asarray(v[r]), np.asarray(p[r], np.int64)
        fired = v_i > 0
        acts[i] = np.where(fired, v_i, 0).astype(np.float32)
        positions[i] = np.where(fired, p_i, -1)
    out["top_activation"], out["top_position"] = acts, positions
    out["top_row"] = [np.where(p >= 0, sample_rows[np.maximum(p, 0)], -1) for p in positions]
  return Measured(*counts, **out)


def context_windows(store, rows: np.ndarray, before: int,
                    after: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids around each global store row within its window, as `Store.context` gives them:
  ([len(rows), before + 1 + after], -1 past a window cut by its edge) and the index of the
  row's own token in each. Each shard's tokens are read once."""
  ids_out = np.full((len(rows), before + 1 + after), -1, np.int64)
  index = np.zeros(len(rows), np.int64)
  shard_of = np.searchsorted(store.offsets, rows, side="right") - 1
  for s in np.unique(shard_of):
    sel = np.nonzero(shard_of == s)[0]
    ids, pos = store.tokens(int(s))
    w, p = np.divmod(pos[rows[sel] - store.offsets[s]].astype(np.int64), ids.shape[1])
    lo = np.maximum(0, p - before)
    for k, wk, pk, lk in zip(sel, w, p, lo):
      window = ids[wk, lk:pk + after + 1]
      ids_out[k, :len(window)] = window
    index[sel] = p - lo
  return ids_out, index


def load_tokenizer(manifest: dict | None):
  """The store's tokenizer if it loads without a network, else None (contexts show ids).

  The manifest's `tokenizer` is a hub id or local path (tried offline only: a match must not
  hang on a download), or {"gguf_dir": ..., "gguf_file": ...} for a GGUF model such as the
  offline default SmolLM2, whose tokenizer transformers reads from the GGUF file itself.
  """
  spec = (manifest or {}).get("tokenizer")
  if not spec:
    return None
  try:
    from transformers import AutoTokenizer
    if isinstance(spec, dict):
      if "gguf_file" in spec:
        with gguf_reading.read_once():
          return AutoTokenizer.from_pretrained(spec.get("gguf_dir", "."),
                                               gguf_file=spec["gguf_file"])
      spec = spec.get("name") or spec.get("path")
      if not spec:
        return None
    return AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
  except Exception:  # noqa: BLE001 - any failure only costs readable tokens, not the match
    return None


def token_strings(tokenizer, ids: list[int]) -> list[str]:
  if tokenizer is None:
    return [f"[{i}]" for i in ids]
  return [tokenizer.decode([i]) for i in ids]


def _save_npz(path: str, **arrays: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  files.atomic_write_bytes(path, buf.getvalue())


def write_measured(out: str, m: Measured, store, before: int, after: int) -> None:
  """importance.npz, contexts.npz and tokens.json (see README.md, "Matching") of `m`."""
  if m.importance is not None:
    _save_npz(os.path.join(out, IMPORTANCE_FILE), tokens=np.int64(m.importance_tokens),
              fvu=np.array(m.fvu, np.float64),
              **{f"sae{i}": v for i, v in enumerate(m.importance)})
  if m.top_row is None:
    return
  rows = np.unique(np.concatenate([r[r >= 0] for r in m.top_row]))
  window, index = context_windows(store, rows, before, after)
  arrays = {"rows": rows, "window": window, "index": index}
  for i, (v, p, r) in enumerate(zip(m.top_activation, m.top_position, m.top_row)):
    arrays.update({f"sae{i}_activation": v, f"sae{i}_position": p, f"sae{i}_row": r})
  _save_npz(os.path.join(out, CONTEXTS_FILE), **arrays)
  tok = load_tokenizer(store.manifest)
  ids = np.unique(window[window >= 0]).tolist()
  files.atomic_write_json(os.path.join(out, TOKENS_FILE), {
      "decoded": tok is not None, "tokenizer": store.manifest.get("tokenizer"),
      "strings": dict(zip(map(str, ids), token_strings(tok, ids)))})


# ---------------------------------------------------------------------------------------------
# Pairs and seeds.


def match_pair(a: formats.CanonicalSAE, b: formats.CanonicalSAE, cfg: MatchConfig,
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
  masks = rule_masks(enc.cols, enc.cos, dec.cols, dec.cos, enc.best, dec.best, cfg.threshold,
                     cfg.strict)
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


def oriented_pairs(saes: Sequence[formats.CanonicalSAE]) -> list[tuple[int, int]]:
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
  text = pd.concat([pd.DataFrame(r) for r in rows], ignore_index=True).to_csv(
      index=False, float_format="%.7g")
  files.atomic_write_bytes(path, text.encode())


def sample_sizes(cfg: MatchConfig, store_path: str | None) -> dict[str, int]:
  """Tokens of the sample each measurement asks for: -1 resolved (frequencies: the default
  when a store is known, else none; the others: as many as the frequencies), 0 for none."""
  freq = cfg.freq_tokens if cfg.freq_tokens >= 0 else (DEFAULT_FREQ_TOKENS if store_path else 0)
  sizes = {"freq_tokens": freq,
           "importance_tokens": cfg.importance_tokens if cfg.importance_tokens >= 0 else freq,
           "scan_tokens": cfg.scan_tokens if cfg.scan_tokens >= 0 else freq}
  if cfg.contexts == 0:
    sizes["scan_tokens"] = 0
  asked = [k for k in sizes if getattr(cfg, k) > 0]
  if asked and not store_path:
    raise JaxsaeError(
        f"{' '.join(f'--{k}={getattr(cfg, k)}' for k in asked)} needs an activation store, but "
        f"{', '.join(cfg.inputs)} name none (no 'store' in a run's run.json or an SAE's "
        f"cfg.json); pass --store=DIR or {' '.join(f'--{k}=0' for k in asked)}")
  return sizes


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
  tokens = sample_sizes(cfg, store_path)
  measured = store = None
  if any(tokens.values()):
    store = store_lib.Store(store_path, expect_d_in=saes[0].d_in)
    site = saes[0].site if saes[0].site in store.sites else None
    measured = measure(saes, store, tokens["freq_tokens"], tokens["importance_tokens"],
                       tokens["scan_tokens"], cfg.contexts, cfg.freq_batch, site=site)
  freqs = measured.frequencies if measured else None
  if freqs is not None and len({len(f) for f in freqs}) == 1:
    freqs = np.stack(freqs)

  os.makedirs(cfg.out, exist_ok=True)
  # match.json marks a complete result: an old one must not vouch for files rewritten now, nor
  # an old measurement stand beside a new match that made none.
  for name in (SUMMARY_FILE, STABILITY_FILE, *MEASURED_FILES):
    if os.path.exists(os.path.join(cfg.out, name)):
      os.remove(os.path.join(cfg.out, name))
  pairs, tables, with_base, matched = [], [], {}, []
  for i, j in tqdm(oriented_pairs(saes), desc="pairs", unit="pair"):
    summary, cols = match_pair(saes[i], saes[j], cfg)
    pairs.append(summary)
    matched.append((i, j, cols))
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

  stable = stability_lib.stability([s.n_latents for s in saes], matched)
  fr = [p["fraction_shared"] for p in pairs]
  has = lambda what: measured is not None and getattr(measured, what) is not None
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
      "store": os.path.abspath(store_path) if store_path and not files.is_remote(store_path)
               else store_path,
      # The store's massive rows, for the report beside the FVU (it renders from here alone).
      "outliers": store.outlier_record(site) if store is not None else None,
      "freq_tokens": measured.freq_tokens if freqs is not None else 0,
      "importance_tokens": measured.importance_tokens if has("fvu") else 0,
      "scan_tokens": measured.scan_tokens if has("top_row") else 0,
      "contexts": cfg.contexts if has("top_row") else 0,
      "seeds": seed_statistics(np.stack([with_base[j] for j in range(1, len(saes))]),
                               cfg.subsets, cfg.seed),
      "stability": stability_lib.summary(stable, names, cfg.definition, cfg.threshold),
      "pairs": pairs,
      "config": dataclasses.asdict(cfg),
      "seconds": round(time.time() - t0, 2),
  }
  _write_latents(os.path.join(cfg.out, LATENTS_FILE), tables)
  stability_lib.write(os.path.join(cfg.out, STABILITY_FILE), stable, names)
  if isinstance(freqs, np.ndarray):
    buf = io.BytesIO()
    np.save(buf, freqs)
    files.atomic_write_bytes(os.path.join(cfg.out, FREQ_FILE), buf.getvalue())
  elif freqs is not None:
    _save_npz(os.path.join(cfg.out, FREQ_RAGGED_FILE),
              **{f"sae{i}": f for i, f in enumerate(freqs)})
  if measured is not None:
    write_measured(cfg.out, measured, store, cfg.before, cfg.after)
  # Last: match.json says the match is complete.
  files.atomic_write_json(os.path.join(cfg.out, SUMMARY_FILE), result)
  widths = "/".join(str(w) for w in sorted({s.n_latents for s in saes}))
  print(f"jaxsae match: {len(pairs)} pairs of {len(saes)} SAEs x {widths} latents: "
        f"{result['fraction_shared_mean']:.3f} shared ({cfg.definition}, threshold "
        f"{cfg.threshold}), decoder PW-MCC {result['decoder_mcc_mean']:.3f}; "
        f"{stable['num_groups']} distinct features across the seeds "
        f"({stable['conflicts']} conflicting edges refused); wrote {cfg.out}/{SUMMARY_FILE}")
  return result


# ---------------------------------------------------------------------------------------------
# Reading a match directory: the one reader that the report, the consensus and the experiments
# share, so that what counts as a complete match is decided in one place.


@dataclasses.dataclass(frozen=True)
class MatchResult:
  """A complete `jaxsae match` directory, as `read` finds it."""
  directory: str
  summary: dict  # match.json
  latents: object  # latents.csv as a pandas DataFrame
  stability: object  # stability.csv as a DataFrame; None where the match predates it
  frequencies: object  # [S, n] (frequencies.npy), one array per SAE (frequencies.npz), or None


def read(match_dir: str) -> MatchResult:
  """match.json, latents.csv, stability.csv and the frequencies of a complete match directory;
  JaxsaeError naming the rerun where one is missing or unreadable."""
  import pandas as pd
  summary_path = os.path.join(match_dir, SUMMARY_FILE)
  table_path = os.path.join(match_dir, LATENTS_FILE)
  for path in (summary_path, table_path):
    if not os.path.isfile(path):
      raise JaxsaeError(f"{path} is missing; run `jaxsae match ... --out={match_dir}` first "
                        "(it writes match.json last, when complete)")
  try:
    with open(summary_path) as f:
      summary = json.load(f)
    table = pd.read_csv(table_path)
    missing = [k for k in ("threshold", "definition", "fraction_shared_mean", "seeds", "pairs")
               if k not in summary] if isinstance(summary, dict) else ["everything"]
    missing += [c for c in ("a", "b", "enc_partner", "enc_cos", "dec_partner", "dec_cos")
                if c not in table.columns]
    stable = stability_lib.read(match_dir)
    freqs = None
    if os.path.isfile(os.path.join(match_dir, FREQ_FILE)):
      freqs = np.load(os.path.join(match_dir, FREQ_FILE))
    elif os.path.isfile(os.path.join(match_dir, FREQ_RAGGED_FILE)) and not missing:
      with np.load(os.path.join(match_dir, FREQ_RAGGED_FILE)) as z:
        freqs = [z[f"sae{i}"] for i in range(len(summary["saes"]))]
  # JSONDecodeError is a ValueError; a damaged .npy or .npz raises ValueError, OSError or a
  # KeyError for a member it lacks.
  except (ValueError, OSError, KeyError, pd.errors.ParserError) as e:
    raise JaxsaeError(f"{match_dir} holds an unreadable match result ({e}); rerun `jaxsae "
                      f"match ... --out={match_dir}`")
  if missing:
    raise JaxsaeError(f"{match_dir} is not a complete `jaxsae match` output (no "
                      f"{', '.join(missing)}); rerun `jaxsae match ... --out={match_dir}`")
  return MatchResult(match_dir, summary, table, stable, freqs)
