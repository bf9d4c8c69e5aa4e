"""A report a person can read, from a `jaxsae match` output.

  jaxsae report MATCH_DIR [--out=DIR]

Writes report.json (every number plotted), one PNG per plot, and report.html: a single file
with the plots embedded, that opens anywhere. The plots follow the paper's figures:

  cosines.png        matched encoder and decoder cosines, threshold marked (shared vs orphan)
  frequency.png      fraction shared against firing frequency
  threshold.png      fraction shared for thresholds 0.5 ... 0.9, every rule
  rules.png          encoder-only, decoder-only, both-above and both-agree sharing compared
  overlap.png        pairwise fraction shared between seeds
  seeds.png          in how many SAEs each base latent is found; found-only-in-base curve

and, when the activation store is at hand, the top-activating contexts of a few shared and a
few high-frequency orphan latents of the base seed, to judge whether orphans are interpretable.
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
  contexts: int = field(5, "top-activating contexts per example latent")
  scan_tokens: int = field(-1, "store tokens scanned for top-activating contexts: -1, the "
                           "tokens the match measured firing frequencies on; N, the first N of "
                           "that same sample; 0, no contexts")
  before: int = field(12, "tokens of context shown before the activating token")
  after: int = field(3, "tokens of context shown after the activating token")
  seed: int = field(0, "seed for picking examples")


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
  """[S, S] fraction shared between seeds (symmetric, 1 on the diagonal)."""
  names = [s["name"] for s in summary["saes"]]
  pos = {n: i for i, n in enumerate(names)}
  m = np.eye(len(names))
  for p in summary["pairs"]:
    i, j = pos[p["a"]], pos[p["b"]]
    m[i, j] = m[j, i] = p["fraction_shared"]
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


def examples_with_contexts(summary: dict, table, cfg: ReportConfig) -> tuple[list[dict], str]:
  """The example latents with decoded contexts, and a note when contexts are unavailable."""
  picks = pick_examples(table, cfg.examples, cfg.seed)
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
    sae = saes_lib.load_sae(summary["saes"][0]["path"], summary["saes"][0]["name"])
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
  bins = np.linspace(min(-0.2, table[["enc_cos", "dec_cos"]].values.min()), 1.0, 61)
  for ax, col, name in ((axes[0], "enc_cos", "encoder"), (axes[1], "dec_cos", "decoder")):
    x = table[col].values
    ax.hist([x[table.shared.values], x[~table.shared.values]], bins=bins, stacked=True,
            label=["shared", "orphan"], color=["tab:blue", "tab:orange"])
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
  fig.colorbar(im, ax=ax, label="fraction shared")
  ax.set_title("pairwise overlap between seeds")
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
  rows = "".join(
      f"<tr><td class=l>{e(p['a'])}</td><td class=l>{e(p['b'])}</td><td>{p['n_latents']}</td>"
      f"<td>{p['n_shared']}</td><td>{p['fraction_shared']:.4f}</td>"
      f"<td>{p['fraction_agree']:.4f}</td><td>{p['encoder_objective']:.3f}</td>"
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
  saes = ", ".join(f"{e(s['name'])} ({e(s['arch'])}, {e(s['layout'])})" for s in summary["saes"])
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxsae match report</title>
<style>{_CSS}</style></head><body>
<h1>Do SAEs trained with different seeds learn the same features?</h1>
<p>{len(summary['saes'])} SAEs of {summary['n_latents']} latents (d_in {summary['d_in']}):
{saes}.</p>
<p>A latent is <b>shared</b> under the headline rule <b>{e(summary['definition'])}</b> at cosine
threshold <b>{t:g}</b>. Mean fraction shared over {len(summary['pairs'])} pairs:
<b>{summary['fraction_shared_mean']:.4f}</b> (std {summary['fraction_shared_std']:.4f},
min {summary['fraction_shared_min']:.4f}, max {summary['fraction_shared_max']:.4f});
shared by all {summary['seeds']['num_saes']} SAEs: {summary['seeds']['fraction_shared_by_all']:.4f}.
Encoder and decoder bijections agree on {summary['fraction_agree_mean']:.4f} of latents.</p>
<h2>Every rule</h2>
<table><tr><th class=l>rule</th><th>mean</th><th>std</th><th>min</th><th>max</th></tr>
{rules}</table>
<h2>Pairs</h2>
<table><tr><th class=l>a</th><th class=l>b</th><th>latents</th><th>shared</th><th>fraction</th>
<th>partners agree</th><th>encoder objective</th><th>decoder objective</th><th>solver</th>
<th>certified gap</th></tr>{rows}</table>
{figs}
<h2>Example latents of {e(summary['saes'][0]['name'])} (against {e(summary['pairs'][0]['b'])})</h2>
{note}{''.join(examples)}
</body></html>
"""


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
  data["examples"], data["context_note"] = examples_with_contexts(summary, table, cfg)

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
  plots["Threshold sensitivity"] = (p("threshold.png"), "Fraction shared as the cosine "
                                    "threshold varies, for every rule.")
  plot_rules(data["rules_compared"], p("rules.png"))
  plots["Encoder, decoder and joint sharing"] = (
      p("rules.png"), f"Fraction of latents above threshold {t:g} on the encoder only, the "
      "decoder only, both, both with the same partner; the max-cos baseline; and how often "
      "the two bijections agree at any cosine.")
  plot_overlap(names, overlap, p("overlap.png"))
  plots["Pairwise overlap"] = (p("overlap.png"), "Fraction shared for every pair of seeds.")
  plot_seeds(summary["seeds"], p("seeds.png"))
  plots["Across seeds"] = (p("seeds.png"), f"Left: in how many SAEs each latent of "
                           f"{names[0]} is found. Right: fraction found only in {names[0]} as "
                           "more SAEs are compared (mean and std over random subsets).")
  data["plots"] = {title: os.path.basename(path) for title, (path, _) in plots.items()}
  files.atomic_write_json(p("report.json"), data)
  files.atomic_write_bytes(p("report.html"), render_html(summary, data, plots).encode())
  print(f"jaxsae report: wrote {p('report.html')} ({len(plots)} plots)")
  return data
