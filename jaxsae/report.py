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
  stability.png      for every seed, how many of its latents are found in 1, 2, ..., S seeds
  importance.png     how much each latent matters to the reconstruction, shared vs orphan

and, when the match measured them on an activation store, the top-activating contexts of a few
shared and a few high-frequency orphan latents of the base seed, to judge whether orphans are
interpretable, and the importance of every latent (the FVU added when that latent alone is
ablated), with the most important frequent orphans and their contexts. A fraction of a pair of
unequal widths is said to be of `a` (the wider, see match.py) unless named otherwise.

The report only renders: every number comes from the match directory (match.json, latents.csv,
importance.npz, contexts.npz, tokens.json), so it needs neither the store nor the SAEs, and
imports no jax.
"""

from __future__ import annotations

import base64
import dataclasses
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
  contexts: int = field(5, "top-activating contexts shown per example latent (at most the "
                        "`jaxsae match --contexts` it kept)")
  seed: int = field(0, "seed for picking examples")
  orphan_min_frequency: float = field(1e-3, "firing frequency an orphan needs to enter the "
                                      "table of the most important orphans")


# ---------------------------------------------------------------------------------------------
# Numbers: pure functions of the per-latent table and match.json.


def threshold_fractions(table, thresholds=THRESHOLDS) -> dict[str, np.ndarray]:
  """Fraction shared per rule: [pairs (latents.csv's order), thresholds]."""
  out: dict[str, list[list[float]]] = {r: [] for r in match_lib.RULES}
  for _, g in table.groupby(["a", "b"], sort=False):
    per_t = [match_lib.rule_masks(g.enc_partner.values, g.enc_cos.values, g.dec_partner.values,
                                  g.dec_cos.values, g.enc_best.values, g.dec_best.values, t)
             for t in thresholds]
    for r in out:
      out[r].append([float(m[r].mean()) for m in per_t])
  return {r: np.array(v).reshape(-1, len(thresholds)) for r, v in out.items()}


def threshold_sweep(table, thresholds=THRESHOLDS) -> dict[str, list[dict]]:
  """Fraction shared per rule at each threshold: mean, min and max over pairs."""
  return {r: [{"threshold": t, "mean": float(x[:, i].mean()), "min": float(x[:, i].min()),
               "max": float(x[:, i].max())} for i, t in enumerate(thresholds)]
          for r, x in threshold_fractions(table, thresholds).items()}


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
# What the match measured on its token sample: read back, never recomputed.


def _npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _measured(match_dir: str, summary: dict, key: str, names: tuple[str, ...],
              what: str) -> tuple[str | None, str]:
  """(path of the match's first file holding `what`, "") or (None, why there is none)."""
  if key not in summary:
    return None, (f"this match predates stored {what}; rerun `jaxsae match ... "
                  f"--out={match_dir}` to measure them")
  if not summary[key]:
    return None, (f"no activation store is known for these SAEs, so no {what}"
                  if not summary.get("store") else f"{what} not requested")
  for name in names:
    if not os.path.isfile(os.path.join(match_dir, name)):
      raise JaxsaeError(f"{match_dir}/{name} is missing, though match.json says {what} were "
                        f"measured; rerun `jaxsae match ... --out={match_dir}`")
  return os.path.join(match_dir, names[0]), ""


def read_importance(match_dir: str, summary: dict) -> tuple[dict | None, str]:
  """({"per_sae": {name: [n]}, "fvu": {name: float}, "tokens": int}, "") from the match's
  importance.npz, or (None, why there is none)."""
  path, note = _measured(match_dir, summary, "importance_tokens", (match_lib.IMPORTANCE_FILE,),
                         "importance")
  if path is None:
    return None, note
  z = _npz(path)
  names = [s["name"] for s in summary["saes"]]
  return {"per_sae": {n: z[f"sae{i}"] for i, n in enumerate(names)},
          "fvu": {n: float(f) for n, f in zip(names, z["fvu"])}, "tokens": int(z["tokens"])}, ""


def read_outliers(summary: dict) -> dict:
  """What the match recorded of its store's site for the report (store.outlier_record: the
  manifest's outlier figures and the one-line warning where massive rows dominate), or
  {"note": why there is none}."""
  o = summary.get("outliers")
  if o:
    return o
  if not summary.get("store"):
    return {}  # the importance section already says there is no store
  if "outliers" not in summary:
    return {"note": "match.json records no outlier figures of the store's site (massive "
                    "activations); the store's manifest.json has them"}
  return {"note": "the match kept no outlier figures of the store's site (massive activations): "
                  "it sampled no rows, or the store was written before they were measured"}


class Contexts:
  """The match's top contexts of every latent (contexts.npz, tokens.json), as the report shows
  them: `of(sae name, latent)` lists up to `top` of them, the largest activation first."""

  def __init__(self, match_dir: str, summary: dict, top: int):
    self.z = _npz(os.path.join(match_dir, match_lib.CONTEXTS_FILE))
    with open(os.path.join(match_dir, match_lib.TOKENS_FILE)) as f:
      tokens = json.load(f)
    self.strings, self.decoded = tokens["strings"], tokens["decoded"]
    self.index = {s["name"]: i for i, s in enumerate(summary["saes"])}
    self.top = top

  def of(self, name: str, latent: int) -> list[dict]:
    i, z = self.index[name], self.z
    out = []
    for act, pos, row in zip(*(z[f"sae{i}_{k}"][latent, :self.top]
                               for k in ("activation", "position", "row"))):
      if pos < 0:
        break
      w = int(np.searchsorted(z["rows"], row))
      ids = [int(t) for t in z["window"][w] if t >= 0]
      out.append({"activation": float(act), "row": int(row), "position": int(pos),
                  "tokens": [self.strings[str(t)] for t in ids], "ids": ids,
                  "index": int(z["index"][w])})
    return out


def read_contexts(match_dir: str, summary: dict, top: int) -> tuple[Contexts | None, str]:
  """The match's stored contexts, `top` per latent shown, and a note for the page."""
  path, note = _measured(match_dir, summary, "scan_tokens",
                         (match_lib.CONTEXTS_FILE, match_lib.TOKENS_FILE), "contexts")
  if path is None or top == 0:
    return None, note or "contexts not requested"
  found = Contexts(match_dir, summary, top)
  return found, "" if found.decoded else "tokenizer not available offline: showing token ids"


def shown(kind: str, latent: int, rows, contexts: Contexts | None, name: str,
          stable=None) -> dict:
  """One latent of the first pair's `a` as the page shows it: partners, frequency, stability
  (`stable`: stability.csv indexed by name and latent, None for a match that predates it),
  contexts."""
  r = rows.loc[latent]
  info = {"kind": kind, "latent": latent,
          "enc_partner": int(r.enc_partner), "enc_cos": float(r.enc_cos),
          "dec_partner": int(r.dec_partner), "dec_cos": float(r.dec_cos)}
  if "frequency" in r:
    info["frequency"] = float(r.frequency)
  if stable is not None:
    st = stable.loc[(name, latent)]
    info.update(found_in=int(st.found_in), group=int(st.group), group_size=int(st.group_size))
  if contexts is not None:
    info["contexts"] = contexts.of(name, latent)
  return info


def _stable_text(ex: dict, num_saes: int) -> str:
  if "found_in" not in ex:
    return ""
  return (f"; found in {ex['found_in']} of {num_saes} seeds, group {ex['group']} "
          f"({ex['group_size']} seeds)")


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


def plot_stability(stability: dict, path: str) -> None:
  """Per seed, how many of its latents are found in 1..S seeds (1: in it alone)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  counts = stability["found_in_counts"]
  s_total = len(counts)
  xs = np.arange(1, s_total + 1)
  width = 0.8 / s_total
  for i, (name, c) in enumerate(counts.items()):
    ax.bar(xs - 0.4 + (i + 0.5) * width, [c[str(x)] for x in xs], width, label=name)
  ax.set_xticks(xs)
  ax.set_xlabel(f"found in how many of the {s_total} seeds (itself included)")
  ax.set_ylabel("latents of the seed")
  ax.set_title(f"{stability['num_groups']} distinct features across the seeds "
               f"({stability['distinct_per_width']:.2f} x one SAE's width); "
               f"{stability['conflicts']} conflicting edges refused", fontsize=9)
  if s_total <= 12:
    ax.legend(fontsize=7, ncol=2)
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
        f"(cos {ex['dec_cos']:.3f}){freq}{_stable_text(ex, len(summary['saes']))}</p>"
        f"{ctx or '<p>no contexts</p>'}")
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
{mcc}{_stability_html(summary)}{unequal}
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


def _stability_html(summary: dict) -> str:
  st = summary.get("stability")
  if not st:
    return ('<p class="note">This match predates per-latent stability; rerun `jaxsae match` '
            'to get stability.csv.</p>')
  return (f"<p>Across all {len(summary['saes'])} seeds the pairwise matches join latents into "
          f"<b>{st['num_groups']}</b> distinct features ({st['distinct_per_width']:.2f} x one "
          f"SAE's width; by seeds found in: {html.escape(json.dumps(st['groups_by_size']))}). "
          f"A group holds at most one latent per seed: {st['conflicts']} conflicting edges were "
          f"refused, touching {st['groups_with_conflict']} groups (stability.csv).</p>")


def _outliers_html(data: dict) -> str:
  """The store's outliers beside the FVU: where massive rows dominate, the FVU is mostly theirs."""
  o = data.get("outliers") or {}
  if o.get("warning"):
    return f'<p class="note"><b>{html.escape(o["warning"])}</b></p>'
  if "massive_variance" not in o:
    return f'<p class="note">{html.escape(o["note"])}</p>' if o.get("note") else ""
  return (f"<p>Store site {html.escape(o['site'])}: {100 * o['massive_rows']:.2g}% of rows are "
          f"over {o.get('over_median', 5):g}x the median norm and hold "
          f"{100 * o['massive_variance']:.0f}% of the centred variance (top dimension "
          f"{100 * o['top_dim_variance']:.0f}%): no massive rows dominate the FVU.</p>")


def _importance_html(summary: dict, data: dict) -> str:
  e = html.escape
  imp = data.get("importance") or {}
  if not imp.get("per_sae"):
    note = imp.get("note")
    return (f'<h2>Importance</h2><p class="note">{e(note)}</p>' if note else "") + \
        _outliers_html(data)
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
    found = f"{ex['found_in']} (group {ex['group']})" if "found_in" in ex else "-"
    rows.append(f"<tr><td>{ex['latent']}</td><td>{ex['importance']:.3g}</td><td>{freq}</td>"
                f"<td>{partner}</td><td>{found}</td>"
                f"<td class=l>{ctx or 'no contexts'}</td></tr>")
  first = summary["pairs"][0]
  fvu = ", ".join(f"{e(k)} {v:.4f}" for k, v in imp["fvu"].items())
  return f"""<h2>Importance of shared and orphan latents</h2>
<p>Importance of a latent: the FVU added when it alone is ablated (its code zeroed, the rest of
the reconstruction kept), on the first {imp['tokens']} store tokens of the sample the
frequencies and contexts come from. Each SAE's FVU there: {fvu}.
Medians over the latents of a in each pair; pooled over pairs: shared
<b>{fmt(imp['median_shared'])}</b>, orphan <b>{fmt(imp['median_orphan'])}</b>.</p>
{_outliers_html(data)}
<table><tr><th class=l>a</th><th class=l>b</th><th>shared</th><th>median importance</th>
<th>orphans</th><th>median importance</th></tr>{pairs}</table>
<h3>The most important frequent orphans of {e(first['a'])} (against {e(first['b'])}; firing
on at least {imp['min_frequency']:g} of tokens)</h3>
<table><tr><th>latent</th><th>importance</th><th>frequency</th><th>decoder partner</th>
<th>found in seeds</th><th class=l>top contexts</th></tr>{''.join(rows)}</table>"""


def _gap(p: dict) -> str:
  gaps = [p.get("encoder_gap"), p.get("decoder_gap")]
  if any(g is None for g in gaps):
    return "exact (scipy)"
  return f"{max(gaps):.2e}"


# ---------------------------------------------------------------------------------------------


def numbers(summary: dict, table) -> dict[str, Any]:
  """Every number the plots draw that latents.csv and match.json give directly."""
  t = summary["threshold"]
  names, overlap = overlap_matrix(summary)
  return {
      "threshold": t,
      "definition": summary["definition"],
      "fraction_shared_mean": summary["fraction_shared_mean"],
      "threshold_sweep": threshold_sweep(table),
      "rules_compared": rules_compared(table, t),
      "frequency_bins": frequency_bins(table),
      "seeds": summary["seeds"],
      "stability": summary.get("stability"),
      "cosine_histograms": {
          col: dict(zip(("counts", "edges"), (h.tolist() for h in np.histogram(
              table[col].values, bins=np.linspace(-1, 1, 81)))))
          for col in ("enc_cos", "dec_cos")},
      "overlap": {"names": names, "matrix": overlap.tolist()},
  }


def importance_data(table, importance: dict, cfg: ReportConfig, show) -> dict:
  """report.json's `importance`: the match's measurement, its split by shared and orphan, and
  the most important frequent orphans of the first pair's `a` (shown as `show` shows them)."""
  per_sae = importance["per_sae"]
  base = per_sae[table.a.iloc[0]]
  top = [{**show("important_orphan", lat), "importance": float(base[lat])}
         for lat in important_orphans(table, base, cfg.examples, cfg.orphan_min_frequency)]
  return {"tokens": importance["tokens"], "fvu": importance["fvu"],
          "min_frequency": cfg.orphan_min_frequency,
          "per_sae": {k: v.tolist() for k, v in per_sae.items()},
          **importance_split(table, per_sae), "top_orphans": top}


def draw(summary: dict, table, data: dict, importance: dict | None,
         out: str) -> dict[str, tuple[str, str]]:
  """Every plot as a PNG in `out`: {title: (path, caption)}, in the page's order."""
  t, names = summary["threshold"], data["overlap"]["names"]
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
  plot_overlap(names, np.array(data["overlap"]["matrix"]), p("overlap.png"))
  plots["Pairwise overlap"] = (p("overlap.png"), "Fraction of the row SAE's latents shared with "
                               "the column SAE, for every pair of seeds.")
  plot_seeds(summary["seeds"], p("seeds.png"))
  plots["Across seeds"] = (p("seeds.png"), f"Left: in how many SAEs each latent of "
                           f"{names[0]} is found. Right: fraction found only in {names[0]} as "
                           "more SAEs are compared (mean and std over random subsets).")
  if "stability" in summary:
    plot_stability(summary["stability"], p("stability.png"))
    plots["Stability of every seed's latents"] = (
        p("stability.png"), f"For every seed, how many of its latents are shared "
        f"({summary['definition']}, threshold {t:g}) with 0, 1, ... of the other seeds "
        "(stability.csv).")
  if importance is not None:
    plot_importance(table, importance["per_sae"], p("importance.png"))
    plots["Importance: shared against orphan"] = (
        p("importance.png"), f"Cumulative distribution of the FVU each latent's ablation adds, "
        f"on {importance['tokens']} tokens, for the shared and the orphan latents of a in every "
        "pair.")
  return plots


def run(cfg: ReportConfig) -> dict:
  """Renders a match directory, and nothing else, as report.json, the PNGs and report.html."""
  if len(cfg.inputs) != 1:
    raise JaxsaeError("pass exactly one MATCH_DIR: the --out of `jaxsae match`")
  match_dir = cfg.inputs[0]
  found = match_lib.read(match_dir)
  summary, table = found.summary, found.latents
  out = cfg.out or match_dir
  os.makedirs(out, exist_ok=True)

  data = numbers(summary, table)
  importance, importance_note = read_importance(match_dir, summary)
  contexts, data["context_note"] = read_contexts(match_dir, summary, cfg.contexts)
  base = table.a.iloc[0]
  rows = table[(table.a == base) & (table.b == table.b.iloc[0])].set_index("latent")
  stable = found.stability
  if stable is not None:
    stable = stable.set_index(["name", "latent"])
  show = lambda kind, lat: shown(kind, lat, rows, contexts, base, stable)
  data["examples"] = [show(kind, lat) for kind, lats in
                      pick_examples(table, cfg.examples, cfg.seed).items() for lat in lats]
  data["importance"] = (importance_data(table, importance, cfg, show) if importance is not None
                        else {"note": importance_note})
  data["outliers"] = read_outliers(summary)

  plots = draw(summary, table, data, importance, out)
  data["plots"] = {title: os.path.basename(path) for title, (path, _) in plots.items()}
  files.atomic_write_json(os.path.join(out, "report.json"), data)
  files.atomic_write_bytes(os.path.join(out, "report.html"),
                           render_html(summary, data, plots).encode())
  print(f"jaxsae report: wrote {os.path.join(out, 'report.html')} ({len(plots)} plots)")
  return data
