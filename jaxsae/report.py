"""A report a person can read, from a `jaxsae match` output.

  jaxsae report MATCH_DIR [--out=DIR]

Writes report.json (every number plotted), one PNG per plot, and report.html: a single file
with the plots embedded, that opens anywhere. The plots follow the paper's figures:

  cosines.png        matched encoder and decoder cosines, threshold marked (shared vs orphan)
  frequency.png      fraction shared against firing frequency
  threshold.png      fraction shared for thresholds 0.5 ... 0.9, every rule
  rules.png          encoder-only, decoder-only, both-above and both-agree sharing compared
  overlap.png        pairwise fraction shared between seeds (of the row's latents)
  seeds.png          in how many SAEs each base latent is found; found-only-in-base curve
  importance.png     how much each latent matters to the reconstruction, shared vs orphan

and, when the activation store is at hand, the top-activating contexts of a few shared and a
few high-frequency orphan latents of the base seed, to judge whether orphans are interpretable,
and the importance of every latent: the FVU added when that latent alone is ablated, on the
tokens the match measured frequencies on, with the most important frequent orphans and their
contexts. A fraction of a pair of unequal widths is said to be of `a` (the wider, see match.py)
unless named otherwise.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import json
import os
from typing import Any

import numpy as np

from jaxsae import files
from jaxsae import match as match_lib
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

THRESHOLDS = tuple(np.round(np.arange(0.5, 0.9001, 0.05), 2).tolist())
RULE_LABELS = {
    "encoder": "encoder only", "decoder": "decoder only", "both_above": "both above",
    "agree": "both agree", "max_cos": "max cos\n(no bijection)",
}


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """Flags of `jaxsae report`."""
  inputs: tuple[str, ...] = field((), "the output directory of `jaxsae match`", positional=True)
  out: str = field("", "directory for report.json, the PNGs and report.html (default: MATCH_DIR)")
  examples: int = field(4, "shared and orphan latents each to show with their top contexts")
  contexts: int = field(5, "top-activating contexts per example latent")
  scan_tokens: int = field(-1, "store tokens scanned for top-activating contexts: -1, the "
                           "tokens the match measured firing frequencies on; N, the first N of "
                           "that same sample; 0, no contexts")
  before: int = field(12, "tokens of context shown before the activating token")
  after: int = field(3, "tokens of context shown after the activating token")
  seed: int = field(0, "seed for picking examples")
  importance_tokens: int = field(-1, "store tokens the importance of every latent (the FVU its "
                                 "ablation adds) is measured on: -1, the tokens the match "
                                 "measured firing frequencies on; N, the first N of that same "
                                 "sample; 0, none")
  orphan_min_frequency: float = field(1e-3, "firing frequency an orphan needs to enter the "
                                      "table of the most important orphans")


# ---------------------------------------------------------------------------------------------
# Numbers: pure functions of the per-latent table and match.json.


def threshold_sweep(table, thresholds=THRESHOLDS) -> dict[str, list[dict]]:
  """Fraction shared per rule at each threshold: mean, min and max over pairs."""
  out: dict[str, list[dict]] = {r: [] for r in ("agree", "both_above", "decoder", "max_cos")}
  groups = list(table.groupby(["a", "b"], sort=False))
  for t in thresholds:
    per_pair = {r: [] for r in out}
    for _, g in groups:
      masks = match_lib.rule_masks(g.enc_partner.values, g.enc_cos.values,
                                   g.dec_partner.values, g.dec_cos.values,
                                   g.enc_best.values, g.dec_best.values, t)
      for r in out:
        per_pair[r].append(float(masks[r].mean()))
    for r in out:
      x = np.array(per_pair[r])
      out[r].append({"threshold": t, "mean": float(x.mean()), "min": float(x.min()),
                     "max": float(x.max())})
  return out


def rules_compared(table, threshold: float) -> dict[str, float]:
  """Fraction of latents shared under encoder-only, decoder-only, and the joint rules."""
  enc = table.enc_cos.values >= threshold
  dec = table.dec_cos.values >= threshold
  return {
      "encoder": float(enc.mean()),
      "decoder": float(dec.mean()),
      "both_above": float((enc & dec).mean()),
      "agree": float(table.shared_agree.mean()),
      "max_cos": float(table.shared_max_cos.mean()),
      "partners_agree": float(table.agree.mean()),
  }


def frequency_bins(table, num_bins: int = 12) -> list[dict]:
  """Fraction shared (headline rule) per log10 firing-frequency bin; dead latents apart."""
  if "frequency" not in table:
    return []
  f = table.frequency.values
  shared = table.shared.values
  out = []
  dead = f <= 0
  if dead.any():
    out.append({"lo": 0.0, "hi": 0.0, "count": int(dead.sum()),
                "fraction_shared": float(shared[dead].mean())})
  if (~dead).any():
    logf = np.log10(f[~dead])
    edges = np.linspace(logf.min(), logf.max() + 1e-9, num_bins + 1)
    idx = np.clip(np.digitize(logf, edges) - 1, 0, num_bins - 1)
    for b in range(num_bins):
      sel = idx == b
      if sel.any():
        out.append({"lo": float(10 ** edges[b]), "hi": float(10 ** edges[b + 1]),
                    "count": int(sel.sum()),
                    "fraction_shared": float(shared[~dead][sel].mean())})
  return out


def overlap_matrix(summary: dict) -> tuple[list[str], np.ndarray]:
  """[S, S]: m[i, j] the fraction of SAE i's latents shared with SAE j (1 on the diagonal;
  symmetric when the widths are equal)."""
  names = [s["name"] for s in summary["saes"]]
  pos = {n: i for i, n in enumerate(names)}
  m = np.eye(len(names))
  for p in summary["pairs"]:
    i, j = pos[p["a"]], pos[p["b"]]
    m[i, j] = p.get("shared_of_a", p["fraction_shared"])
    m[j, i] = p.get("shared_of_b", p["fraction_shared"])
  return names, m


def pick_examples(table, n: int, seed: int = 0) -> dict[str, list[int]]:
  """Latents of the first pair's base seed to show: shared ones, and the most frequent orphans.

  Orphans are ranked by firing frequency because a frequent orphan is the surprising case:
  the paper finds orphans are not simply rare or dead latents.
  """
  first = table[(table.a == table.a.iloc[0]) & (table.b == table.b.iloc[0])]
  rng = np.random.default_rng(seed)
  shared = first[first.shared]
  orphans = first[~first.shared]
  if "frequency" in first:
    orphans = orphans.sort_values("frequency", ascending=False, kind="stable")
    shared = shared.sort_values("frequency", ascending=False, kind="stable")
    shared_ids = shared.latent.values[:n]
  else:
    shared_ids = rng.permutation(shared.latent.values)[:n]
  return {"shared": [int(i) for i in shared_ids],
          "orphan": [int(i) for i in orphans.latent.values[:n]]}


def important_orphans(table, importance: np.ndarray, n: int, min_frequency: float) -> list[int]:
  """The first pair's orphans of `a` that fire on at least `min_frequency` of the tokens (all,
  without frequencies), most important first."""
  first = table[(table.a == table.a.iloc[0]) & (table.b == table.b.iloc[0])]
  orphans = first[~first.shared]
  if "frequency" in orphans:
    orphans = orphans[orphans.frequency >= min_frequency]
  lats = orphans.latent.values
  order = np.argsort(-importance[lats], kind="stable")
  return [int(i) for i in lats[order][:n]]


def importance_split(table, per_sae: dict[str, np.ndarray]) -> dict:
  """Medians of the importance of shared and orphan latents: per pair (the latents of `a`, as
  latents.csv lists them) and pooled over pairs (a latent counts once per pair it is a's in)."""
  out, pooled = [], {"shared": [], "orphan": []}
  for (a, b), g in table.groupby(["a", "b"], sort=False):
    imp = per_sae[a][g.latent.values]
    sh = g.shared.values.astype(bool)
    med = lambda x: float(np.median(x)) if len(x) else None
    out.append({"a": a, "b": b, "n_shared": int(sh.sum()), "n_orphan": int((~sh).sum()),
                "median_shared": med(imp[sh]), "median_orphan": med(imp[~sh])})
    pooled["shared"].append(imp[sh])
    pooled["orphan"].append(imp[~sh])
  cat = {k: np.concatenate(v) for k, v in pooled.items()}
  return {"pairs": out,
          "median_shared": float(np.median(cat["shared"])) if len(cat["shared"]) else None,
          "median_orphan": float(np.median(cat["orphan"])) if len(cat["orphan"]) else None}


# ---------------------------------------------------------------------------------------------
# Contexts.


def load_tokenizer(manifest: dict | None):
  """The store's tokenizer if it loads without a network, else None (contexts show ids).

  The manifest's `tokenizer` is a hub id or local path (tried offline only: a report must not
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
        return AutoTokenizer.from_pretrained(spec.get("gguf_dir", "."),
                                             gguf_file=spec["gguf_file"])
      spec = spec.get("name") or spec.get("path")
      if not spec:
        return None
    return AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
  except Exception:  # noqa: BLE001 - any failure only costs readable tokens, not the report
    return None


def token_strings(tokenizer, ids: list[int]) -> list[str]:
  if tokenizer is None:
    return [f"[{i}]" for i in ids]
  return [tokenizer.decode([i]) for i in ids]


def _encoder(sae):
  """(weights, encode): `sae`'s weights as arrays, and the pure function encode(weights, x)
  of raw store rows x [rows, d_in] to latent activations [rows, n]. The one place the report
  encodes."""
  from jaxsae import saes as saes_lib
  graphdef, state = saes_lib.encoder(sae)  # the graph is static, the state an argument
  return state, lambda w, x: saes_lib.encode(graphdef, w, x, sae.input_scale)


def top_contexts(sae, store, latents: list[int], num_tokens: int, top: int,
                 batch_size: int = 1024,
                 site: str | None = None) -> dict[int, list[tuple[float, int]]]:
  """(activation, store row) of each latent's `top` largest activations on the first
  `num_tokens` tokens of the sample firing frequencies are measured on (match.token_sample);
  ties go to the token met first."""
  import jax
  import jax.numpy as jnp

  weights, encode = _encoder(sae)

  @jax.jit
  def acts(weights, x, cols):
    # The weights are an argument, not closed over: a closed-over array would be baked into
    # the compiled program as a constant.
    return encode(weights, x)[:, cols]

  cols = jnp.asarray(latents)
  best_v = np.full((len(latents), 0), -np.inf)
  best_r = np.zeros((len(latents), 0), np.int64)
  for x, rows, take in match_lib.token_sample(store, num_tokens, batch_size, site):
    a = np.asarray(acts(weights, x, cols))[:take].T  # [latents, rows]
    v = np.concatenate([best_v, a], axis=1)
    r = np.concatenate([best_r, np.broadcast_to(rows[:take], a.shape)], axis=1)
    keep = np.argsort(-v, axis=1, kind="stable")[:, :top]
    best_v, best_r = np.take_along_axis(v, keep, 1), np.take_along_axis(r, keep, 1)
  return {lat: [(float(v), int(r)) for v, r in zip(best_v[i], best_r[i]) if v > 0]
          for i, lat in enumerate(latents)}


def examples_with_contexts(summary: dict, table, cfg: ReportConfig,
                           extra: dict[str, list[int]] | None = None) -> tuple[list[dict], str]:
  """The example latents (and `extra` latents of the first pair's `a`, by kind) with decoded
  contexts, and a note when contexts are unavailable."""
  picks = {**pick_examples(table, cfg.examples, cfg.seed), **(extra or {})}
  rows = table[(table.a == table.a.iloc[0]) & (table.b == table.b.iloc[0])].set_index("latent")
  base = [dict(kind=kind, latent=lat, **_row_info(rows.loc[lat]))
          for kind, lats in picks.items() for lat in lats]
  store_path = summary.get("store")
  if cfg.scan_tokens == 0 or not base:
    return base, "contexts not requested"
  if not store_path:
    return base, "no activation store is known for these SAEs, so no contexts"
  from jaxsae import saes as saes_lib
  from jaxsae import store as store_lib
  try:
    store = store_lib.Store(store_path)
    entry = _sae_entry(summary, table.a.iloc[0])
    sae = saes_lib.load_sae(entry["path"], entry["name"])
  except (JaxsaeError, OSError) as e:
    return base, f"contexts unavailable: {e}"
  site = sae.site if sae.site in store.sites else None
  # The match's own sample, so that a latent's contexts and its frequency describe the same
  # tokens.
  scan = cfg.scan_tokens
  if scan < 0:
    scan = summary.get("freq_tokens") or match_lib.DEFAULT_FREQ_TOKENS
  batch = summary.get("config", {}).get("freq_batch", 1024)
  found = top_contexts(sae, store, [e["latent"] for e in base], scan, cfg.contexts,
                       batch_size=batch, site=site)
  tok = load_tokenizer(store.manifest)
  for e in base:
    e["contexts"] = []
    for act, row in found[e["latent"]]:
      ids, at = store.context(row, cfg.before, cfg.after)
      e["contexts"].append({"activation": act, "row": row, "tokens": token_strings(tok, ids),
                            "ids": ids, "index": at})
  note = "" if tok is not None else "tokenizer not available offline: showing token ids"
  return base, note


def _row_info(r) -> dict:
  info = {"enc_partner": int(r.enc_partner), "enc_cos": float(r.enc_cos),
          "dec_partner": int(r.dec_partner), "dec_cos": float(r.dec_cos)}
  if "frequency" in r:
    info["frequency"] = float(r.frequency)
  return info


def _sae_entry(summary: dict, name: str) -> dict:
  return next(s for s in summary["saes"] if s["name"] == name)


# ---------------------------------------------------------------------------------------------
# Importance: what ablating one latent costs the reconstruction.


def importance(saes, store, num_tokens: int, batch_size: int = 1024, site: str | None = None,
               progress: bool = True) -> tuple[list[np.ndarray], list[float], int]:
  """The FVU each latent's ablation alone adds, for every latent of every SAE: ([n_s] per SAE,
  each SAE's FVU, tokens), on the first `num_tokens` of the sample frequencies are measured on
  (match.token_sample).

  With codes z = encode(x) and error e = x - decode(z), zeroing latent i adds z_i W_dec[i] to
  the error (every architecture decodes linearly, and the other codes do not move), so
      delta_SSE_i = sum_t 2 z_ti <e_t, W_dec[i]> + z_ti^2 |W_dec[i]|^2,
  one [tokens, d] x [d, n] product beside the encode: no re-encoding per latent. Divided by the
  sample's total variance sum_t |x_t - mean(x)|^2 it is an FVU difference, as the trainer's FVU
  (sae/common.py), in the SAE's own input scale.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tqdm import tqdm
  from jaxsae import saes as saes_lib

  @functools.partial(jax.jit, static_argnums=0)
  def step(graphdef, state, scale, x, valid, shift):
    m = nnx.merge(graphdef, state)
    x = x * scale
    z = m.encode(x)
    w = valid[:, None].astype(jnp.float32)
    e = (x - m.decode(z)) * w
    z = z * w
    w_dec = m.W_dec[...]
    g = jnp.dot(e, w_dec.T, precision=jax.lax.Precision.HIGHEST)  # [batch, n] <e_t, W_dec[i]>
    d_sse = jnp.sum(2 * z * g + jnp.square(z) * jnp.sum(jnp.square(w_dec), 1), axis=0)
    # Shifted by a first-batch mean so that the variance is not a difference of large sums.
    xc = (x - shift) * w
    return d_sse, jnp.sum(jnp.square(e)), xc.sum(0), jnp.sum(jnp.square(xc))

  num_tokens = min(num_tokens, store.num_tokens)
  models = [(*saes_lib.encoder(s), np.float32(s.input_scale)) for s in saes]
  acc = [[np.zeros(s.n_latents), 0.0, np.zeros(s.d_in), 0.0] for s in saes]
  shifts = None
  bar = tqdm(total=num_tokens * len(saes), desc="importance", unit="tok", disable=not progress)
  for x, _, take in match_lib.token_sample(store, num_tokens, batch_size, site):
    if shifts is None:
      shifts = [np.float32(sc) * x[:take].astype(np.float64).mean(0).astype(np.float32)
                for _, _, sc in models]
    valid = np.arange(len(x)) < take
    for a, (graphdef, state, scale), shift in zip(acc, models, shifts):
      for k, v in enumerate(step(graphdef, state, scale, x, valid, shift)):
        a[k] = a[k] + np.asarray(v, np.float64)
      bar.update(take)
  bar.close()
  imps, fvus = [], []
  for d_sse, sse, sx, sq in acc:
    total_var = sq - float(sx @ sx) / num_tokens
    imps.append(d_sse / total_var)
    fvus.append(float(sse / total_var))
  return imps, fvus, num_tokens


def importance_of(summary: dict, cfg: ReportConfig, progress: bool = True):
  """(per-SAE importance by name, FVU by name, tokens), or (None, note) when unavailable."""
  if cfg.importance_tokens == 0:
    return None, "importance not requested"
  if not summary.get("store"):
    return None, "no activation store is known for these SAEs, so no importance"
  from jaxsae import saes as saes_lib
  from jaxsae import store as store_lib
  try:
    store = store_lib.Store(summary["store"])
    saes = [saes_lib.load_sae(s["path"], s["name"]) for s in summary["saes"]]
  except (JaxsaeError, OSError) as e:
    return None, f"importance unavailable: {e}"
  site = saes[0].site if saes[0].site in store.sites else None
  n = cfg.importance_tokens
  if n < 0:
    n = summary.get("freq_tokens") or match_lib.DEFAULT_FREQ_TOKENS
  batch = summary.get("config", {}).get("freq_batch", 1024)
  imps, fvus, tokens = importance(saes, store, n, batch, site, progress)
  names = [s.name for s in saes]
  return (dict(zip(names, imps)), dict(zip(names, fvus)), tokens), ""


# ---------------------------------------------------------------------------------------------
# Plots.


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_cosines(table, threshold: float, path: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
  # Latents without a partner (unequal widths) have no cosine (NaN): they are left out.
  bins = np.linspace(min(-0.2, np.nanmin(table[["enc_cos", "dec_cos"]].values)), 1.0, 61)
  for ax, col, name in ((axes[0], "enc_cos", "encoder"), (axes[1], "dec_cos", "decoder")):
    x = table[col].values
    has = ~np.isnan(x)
    ax.hist([x[has & table.shared.values], x[has & ~table.shared.values]], bins=bins,
            stacked=True, label=["shared", "orphan"], color=["tab:blue", "tab:orange"])
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel(f"matched {name} cosine")
    ax.set_title(f"{name}: optimal-bijection partner cosine")
  axes[0].set_ylabel("latents (all pairs)")
  axes[0].legend()
  _save(fig, path)


def plot_frequency(bins: list[dict], path: str) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  live = [b for b in bins if b["hi"] > 0]
  if live:
    centers = [np.sqrt(b["lo"] * b["hi"]) for b in live]
    ax.plot(centers, [b["fraction_shared"] for b in live], "o-")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels collide at narrow ranges
    for c, b in zip(centers, live):
      ax.annotate(str(b["count"]), (c, b["fraction_shared"]), fontsize=7,
                  textcoords="offset points", xytext=(0, 5), ha="center")
  dead = [b for b in bins if b["hi"] == 0]
  if dead:
    ax.set_title(f"dead latents (never fired): {dead[0]['count']}, "
                 f"{dead[0]['fraction_shared']:.2f} shared", fontsize=9)
  ax.set_xlabel("firing frequency of the latent (log scale; labels: latents per bin)")
  ax.set_ylabel("fraction shared")
  ax.set_ylim(-0.02, 1.02)
  _save(fig, path)


def plot_threshold(sweep: dict, threshold: float, path: str) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  for rule, pts in sweep.items():
    t = [p["threshold"] for p in pts]
    m = np.array([p["mean"] for p in pts])
    ax.plot(t, m, "o-", label=RULE_LABELS.get(rule, rule).replace("\n", " "))
    ax.fill_between(t, [p["min"] for p in pts], [p["max"] for p in pts], alpha=0.15)
  ax.axvline(threshold, color="k", ls="--", lw=1)
  ax.set_xlabel("cosine threshold")
  ax.set_ylabel("fraction shared")
  ax.set_title("mean over pairs; band: min to max", fontsize=9)
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_rules(rules: dict, path: str) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  keys = ["encoder", "decoder", "both_above", "agree", "max_cos", "partners_agree"]
  labels = [RULE_LABELS.get(k, "partners agree\n(any cosine)") for k in keys]
  fig.subplots_adjust(bottom=0.2)
  vals = [rules[k] for k in keys]
  bars = ax.bar(range(len(keys)), vals, color=["tab:green", "tab:purple", "tab:gray",
                                               "tab:blue", "tab:olive", "tab:cyan"])
  ax.bar_label(bars, fmt="%.3f", fontsize=8)
  ax.set_xticks(range(len(keys)), labels, fontsize=8)
  ax.set_ylabel("fraction of latents")
  ax.set_ylim(0, 1.08)
  _save(fig, path)


def plot_overlap(names: list[str], m: np.ndarray, path: str) -> None:
  plt = _plt()
  size = max(3.5, 0.6 * len(names) + 2)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  if len(names) <= 12:
    for i in range(len(names)):
      for j in range(len(names)):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="w" if m[i, j] < 0.6 else "k")
  fig.colorbar(im, ax=ax, label="fraction of the row's latents shared")
  ax.set_title("pairwise overlap between seeds")
  ax.set_ylabel("fraction of this SAE's latents")
  _save(fig, path)


def plot_seeds(seeds: dict, path: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  counts = seeds["found_in_counts"]
  ks = sorted(counts, key=int)
  axes[0].bar([int(k) for k in ks], [counts[k] for k in ks])
  axes[0].set_xticks([int(k) for k in ks])
  axes[0].set_xlabel(f"found in how many of the {seeds['num_saes']} SAEs")
  axes[0].set_ylabel("latents of the base seed")
  curve = seeds["fraction_only_base"]
  m = [c["num_saes"] for c in curve]
  axes[1].errorbar(m, [c["mean"] for c in curve], yerr=[c["std"] for c in curve], fmt="o-",
                   capsize=3)
  axes[1].set_xlabel("SAEs compared (base included; random subsets)")
  axes[1].set_ylabel("fraction found only in the base seed")
  axes[1].set_ylim(-0.02, 1.02)
  _save(fig, path)


def plot_importance(table, per_sae: dict[str, np.ndarray], path: str) -> None:
  """CDFs of the importance of shared and orphan latents, pooled over the pairs' `a` latents."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  groups = {"shared": [], "orphan": []}
  for (a, _), g in table.groupby(["a", "b"], sort=False):
    imp = per_sae[a][g.latent.values]
    groups["shared"].append(imp[g.shared.values.astype(bool)])
    groups["orphan"].append(imp[~g.shared.values.astype(bool)])
  xs = {kind: np.sort(np.concatenate(parts)) for kind, parts in groups.items()}
  both = np.abs(np.concatenate(list(xs.values())))
  # Log scale for the positive bulk; linear around 0, where dead latents (exactly 0) and the
  # few whose ablation helps (negative) sit.
  nonzero = both[both > 0]
  linthresh = float(np.percentile(nonzero, 5)) if len(nonzero) else 1.0
  for (kind, x), color in zip(xs.items(), ("tab:blue", "tab:orange")):
    if len(x):
      ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=color,
              label=f"{kind}: {len(x)} latents, median {np.median(x):.3g}, "
                    f"{int((x <= 0).sum())} at or below 0")
  ax.set_xscale("symlog", linthresh=linthresh)
  ax.axvline(0, color="k", lw=0.5)
  ax.set_xlabel(f"importance: FVU added by ablating the latent alone (log scale beyond "
                f"+-{linthresh:.2g})")
  ax.set_ylabel("fraction of latents at or below")
  pairs = table.groupby(["a", "b"], sort=False).ngroups
  first = f"{table.a.iloc[0]} against {table.b.iloc[0]}"
  ax.set_title(f"the latents of a in {first}" if pairs == 1 else
               f"pooled over {pairs} pairs, the latents of a in each (first: {first})",
               fontsize=9)
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=8)
  _save(fig, path)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _plt().close(fig)


# ---------------------------------------------------------------------------------------------
# HTML.

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap;
       background: #fafafa; border-left: 3px solid #ccc; padding: 2px 6px; margin: 2px 0; }
.ctx mark { background: #ffd54f; font-weight: bold; }
.note { color: #a15c00; }
"""


def _img(path: str, alt: str) -> str:
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode()
  return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _context_html(c: dict) -> str:
  parts = []
  for i, t in enumerate(c["tokens"]):
    t = html.escape(t)
    parts.append(f"<mark>{t}</mark>" if i == c["index"] else t)
  return (f'<div class="ctx">{c["activation"]:.3g} &nbsp; {"".join(parts)}</div>')


def render_html(summary: dict, data: dict, plots: dict[str, tuple[str, str]]) -> str:
  e = html.escape
  t = summary["threshold"]
  num = lambda p, key, fmt=".4f": format(p[key], fmt) if key in p else "-"
  rows = "".join(
      f"<tr><td class=l>{e(p['a'])}</td><td class=l>{e(p['b'])}</td>"
      f"<td>{p.get('n_a', p['n_latents'])}</td><td>{p.get('n_b', p['n_latents'])}</td>"
      f"<td>{p['n_shared']}</td><td>{num(p, 'shared_of_a')}</td><td>{num(p, 'shared_of_b')}</td>"
      f"<td>{p['fraction_agree']:.4f}</td><td>{num(p, 'decoder_mcc')}</td>"
      f"<td>{num(p, 'encoder_mcc')}</td><td>{p['encoder_objective']:.3f}</td>"
      f"<td>{p['decoder_objective']:.3f}</td><td>{e(p['encoder_method'])}</td>"
      f"<td>{_gap(p)}</td></tr>" for p in summary["pairs"])
  rules = "".join(
      f"<tr><td class=l>{e(r)}</td><td>{s['mean']:.4f}</td><td>{s['std']:.4f}</td>"
      f"<td>{s['min']:.4f}</td><td>{s['max']:.4f}</td></tr>"
      for r, s in summary["rules"].items())
  figs = "".join(
      f"<h2>{e(title)}</h2><figure>{_img(path, title)}<figcaption>{e(caption)}</figcaption>"
      f"</figure>" for title, (path, caption) in plots.items())
  examples = []
  for ex in data["examples"]:
    ctx = "".join(_context_html(c) for c in ex.get("contexts", []))
    freq = f", frequency {ex['frequency']:.3g}" if "frequency" in ex else ""
    examples.append(
        f"<h3>{e(ex['kind'])} latent {ex['latent']}</h3><p>encoder partner {ex['enc_partner']} "
        f"(cos {ex['enc_cos']:.3f}), decoder partner {ex['dec_partner']} "
        f"(cos {ex['dec_cos']:.3f}){freq}</p>{ctx or '<p>no contexts</p>'}")
  note = f'<p class="note">{e(data["context_note"])}</p>' if data["context_note"] else ""
  saes = ", ".join(f"{e(s['name'])} ({e(s['arch'])}, {e(s['layout'])}"
                   f"{', ' + str(s['n_latents']) + ' latents' if 'n_latents' in s else ''})"
                   for s in summary["saes"])
  widths = sorted({s.get("n_latents", summary["n_latents"]) for s in summary["saes"]})
  mcc = ("" if "decoder_mcc_mean" not in summary else
         f"<p>Mean matched cosine of the optimal bijection (PW-MCC, no threshold), mean over "
         f"pairs: decoder <b>{summary['decoder_mcc_mean']:.4f}</b> (std "
         f"{summary['decoder_mcc_std']:.4f}), encoder <b>{summary['encoder_mcc_mean']:.4f}</b> "
         f"(std {summary['encoder_mcc_std']:.4f}).</p>")
  unequal = ("" if len(widths) == 1 else
             "<p>The SAEs differ in width: each pair is listed wider first (a), every latent of "
             "the narrower (b) has a partner and the rest of a's have none. Fractions are of a's "
             "latents unless the column names b.</p>")
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxsae match report</title>
<style>{_CSS}</style></head><body>
<h1>Do SAEs trained with different seeds learn the same features?</h1>
<p>{len(summary['saes'])} SAEs of {'/'.join(map(str, widths))} latents (d_in {summary['d_in']}):
{saes}.</p>
<p>A latent is <b>shared</b> under the headline rule <b>{e(summary['definition'])}</b> at cosine
threshold <b>{t:g}</b>. Mean fraction shared over {len(summary['pairs'])} pairs:
<b>{summary['fraction_shared_mean']:.4f}</b> (std {summary['fraction_shared_std']:.4f},
min {summary['fraction_shared_min']:.4f}, max {summary['fraction_shared_max']:.4f});
shared by all {summary['seeds']['num_saes']} SAEs: {summary['seeds']['fraction_shared_by_all']:.4f}.
Encoder and decoder bijections agree on {summary['fraction_agree_mean']:.4f} of latents.</p>
{mcc}{unequal}
<h2>Every rule</h2>
<table><tr><th class=l>rule</th><th>mean</th><th>std</th><th>min</th><th>max</th></tr>
{rules}</table>
<h2>Pairs</h2>
<table><tr><th class=l>a</th><th class=l>b</th><th>latents of a</th><th>latents of b</th>
<th>shared</th><th>fraction of a</th><th>fraction of b</th><th>partners agree</th>
<th>decoder PW-MCC</th><th>encoder PW-MCC</th><th>encoder objective</th>
<th>decoder objective</th><th>solver</th><th>certified gap</th></tr>{rows}</table>
{figs}
{_importance_html(summary, data)}
<h2>Example latents of {e(summary['pairs'][0]['a'])} (against {e(summary['pairs'][0]['b'])})</h2>
{note}{''.join(examples)}
</body></html>
"""


def _importance_html(summary: dict, data: dict) -> str:
  e = html.escape
  imp = data.get("importance") or {}
  if not imp.get("per_sae"):
    note = imp.get("note")
    return f'<h2>Importance</h2><p class="note">{e(note)}</p>' if note else ""
  fmt = lambda v: "-" if v is None else f"{v:.3g}"
  pairs = "".join(
      f"<tr><td class=l>{e(p['a'])}</td><td class=l>{e(p['b'])}</td><td>{p['n_shared']}</td>"
      f"<td>{fmt(p['median_shared'])}</td><td>{p['n_orphan']}</td><td>{fmt(p['median_orphan'])}"
      f"</td></tr>" for p in imp["pairs"])
  rows = []
  for ex in imp["top_orphans"]:
    ctx = "".join(_context_html(c) for c in ex.get("contexts", []))
    freq = f"{ex['frequency']:.3g}" if "frequency" in ex else "-"
    partner = (f"{ex['dec_partner']} (cos {ex['dec_cos']:.3f})" if ex["dec_partner"] >= 0
               else "none")
    rows.append(f"<tr><td>{ex['latent']}</td><td>{ex['importance']:.3g}</td><td>{freq}</td>"
                f"<td>{partner}</td><td class=l>{ctx or 'no contexts'}</td></tr>")
  first = summary["pairs"][0]
  fvu = ", ".join(f"{e(k)} {v:.4f}" for k, v in imp["fvu"].items())
  return f"""<h2>Importance of shared and orphan latents</h2>
<p>Importance of a latent: the FVU added when it alone is ablated (its code zeroed, the rest of
the reconstruction kept), on the first {imp['tokens']} store tokens of the sample the
frequencies and contexts come from. Each SAE's FVU there: {fvu}.
Medians over the latents of a in each pair; pooled over pairs: shared
<b>{fmt(imp['median_shared'])}</b>, orphan <b>{fmt(imp['median_orphan'])}</b>.</p>
<table><tr><th class=l>a</th><th class=l>b</th><th>shared</th><th>median importance</th>
<th>orphans</th><th>median importance</th></tr>{pairs}</table>
<h3>The most important frequent orphans of {e(first['a'])} (against {e(first['b'])}; firing
on at least {imp['min_frequency']:g} of tokens)</h3>
<table><tr><th>latent</th><th>importance</th><th>frequency</th><th>decoder partner</th>
<th class=l>top contexts</th></tr>{''.join(rows)}</table>"""


def _gap(p: dict) -> str:
  gaps = [p.get("encoder_gap"), p.get("decoder_gap")]
  if any(g is None for g in gaps):
    return "exact (scipy)"
  return f"{max(gaps):.2e}"


# ---------------------------------------------------------------------------------------------


def run(cfg: ReportConfig) -> dict:
  """Reads a match directory and writes report.json, the PNGs and report.html."""
  import pandas as pd

  if len(cfg.inputs) != 1:
    raise JaxsaeError("pass exactly one MATCH_DIR: the --out of `jaxsae match`")
  match_dir = cfg.inputs[0]
  summary_path = os.path.join(match_dir, match_lib.SUMMARY_FILE)
  table_path = os.path.join(match_dir, match_lib.LATENTS_FILE)
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
  except (ValueError, pd.errors.ParserError) as e:  # JSONDecodeError is a ValueError
    raise JaxsaeError(f"{match_dir} holds an unreadable match result ({e}); rerun `jaxsae "
                      f"match ... --out={match_dir}`")
  if missing:
    raise JaxsaeError(f"{match_dir} is not a complete `jaxsae match` output (no "
                      f"{', '.join(missing)}); rerun `jaxsae match ... --out={match_dir}`")
  out = cfg.out or match_dir
  os.makedirs(out, exist_ok=True)
  t = summary["threshold"]

  data: dict[str, Any] = {
      "threshold": t,
      "definition": summary["definition"],
      "fraction_shared_mean": summary["fraction_shared_mean"],
      "threshold_sweep": threshold_sweep(table),
      "rules_compared": rules_compared(table, t),
      "frequency_bins": frequency_bins(table),
      "seeds": summary["seeds"],
      "cosine_histograms": {
          col: dict(zip(("counts", "edges"), (h.tolist() for h in np.histogram(
              table[col].values, bins=np.linspace(-1, 1, 81)))))
          for col in ("enc_cos", "dec_cos")},
  }
  names, overlap = overlap_matrix(summary)
  data["overlap"] = {"names": names, "matrix": overlap.tolist()}
  found, note = importance_of(summary, cfg)
  extra = {}
  if found is not None:
    per_sae, fvus, tokens = found
    extra["important_orphan"] = important_orphans(table, per_sae[table.a.iloc[0]], cfg.examples,
                                                  cfg.orphan_min_frequency)
    data["importance"] = {"tokens": tokens, "fvu": fvus, "min_frequency": cfg.orphan_min_frequency,
                          "per_sae": {k: v.tolist() for k, v in per_sae.items()},
                          **importance_split(table, per_sae)}
  else:
    data["importance"] = {"note": note}
  found_examples, data["context_note"] = examples_with_contexts(summary, table, cfg, extra)
  data["examples"] = [x for x in found_examples if x["kind"] != "important_orphan"]
  if found is not None:
    top = [x for x in found_examples if x["kind"] == "important_orphan"]
    for x in top:
      x["importance"] = float(per_sae[table.a.iloc[0]][x["latent"]])
    data["importance"]["top_orphans"] = top

  p = lambda name: os.path.join(out, name)
  plots = {}
  plot_cosines(table, t, p("cosines.png"))
  plots["Matched cosines"] = (p("cosines.png"), "Cosine of each latent with its partner in "
                              "the optimal bijection, all pairs; the paper sees two modes.")
  if data["frequency_bins"]:
    plot_frequency(data["frequency_bins"], p("frequency.png"))
    plots["Sharing against firing frequency"] = (
        p("frequency.png"), f"Fraction shared ({summary['definition']}) per frequency bin, "
        f"measured on {summary.get('freq_tokens', 0)} tokens.")
  plot_threshold(data["threshold_sweep"], t, p("threshold.png"))
  plots["Threshold sensitivity"] = (p("threshold.png"), "Fraction of a's latents shared as the "
                                    "cosine threshold varies, for every rule.")
  plot_rules(data["rules_compared"], p("rules.png"))
  plots["Encoder, decoder and joint sharing"] = (
      p("rules.png"), f"Fraction of latents above threshold {t:g} on the encoder only, the "
      "decoder only, both, both with the same partner; the max-cos baseline; and how often "
      "the two bijections agree at any cosine.")
  plot_overlap(names, overlap, p("overlap.png"))
  plots["Pairwise overlap"] = (p("overlap.png"), "Fraction of the row SAE's latents shared with "
                               "the column SAE, for every pair of seeds.")
  plot_seeds(summary["seeds"], p("seeds.png"))
  plots["Across seeds"] = (p("seeds.png"), f"Left: in how many SAEs each latent of "
                           f"{names[0]} is found. Right: fraction found only in {names[0]} as "
                           "more SAEs are compared (mean and std over random subsets).")
  if found is not None:
    plot_importance(table, per_sae, p("importance.png"))
    plots["Importance: shared against orphan"] = (
        p("importance.png"), f"Cumulative distribution of the FVU each latent's ablation adds, "
        f"on {tokens} tokens, for the shared and the orphan latents of a in every pair.")
  data["plots"] = {title: os.path.basename(path) for title, (path, _) in plots.items()}
  files.atomic_write_json(p("report.json"), data)
  files.atomic_write_bytes(p("report.html"), render_html(summary, data, plots).encode())
  print(f"jaxsae report: wrote {p('report.html')} ({len(plots)} plots)")
  return data
