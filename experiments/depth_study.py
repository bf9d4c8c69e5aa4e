"""Sharing by depth and by site: the paper's layer figure and its residual-vs-MLP comparison.

One extraction writes the MLP output and the residual stream (a layer's output) of every layer
in --layers into one store; each (site, layer) is then an ordinary point of S seeds trained at
once and matched. `--study=layers` draws the MLP points against relative depth beside the
paper's three Pythia-160M curves; `--study=sites` sets the residual stream against the MLP
output at the same layers, beside the paper's pairs for three models. Both studies share the
store and the MLP runs, so whichever runs second trains only what the first did not.
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("mlp", "resid")
RULE_LAYERS = "both_above"  # the paper's layer figure: shared fraction at 0.7
RULE_SITES = "decoder"  # its residual-vs-MLP table: the decoder-only rule
MASSIVE = 5.0  # a row whose norm is over this x the median counts as massive


def site_requests(layers) -> list[str]:
  """The extraction's sites, in store order: every layer's MLP output, then its residual
  stream, as layer shorthand (so any family resolves them; negative layers count from the
  last)."""
  return [f"{kind}:{int(layer)}" for kind in KINDS for layer in layers]


def layer_of(site: str) -> int:
  """The decoder layer of a resolved module path (model.layers.15.mlp -> 15)."""
  m = re.search(r"\.(\d+)(?:\.|:|$)", site)
  if m is None:
    raise ValueError(f"site {site!r} names no layer")
  return int(m.group(1))


def sites_by_kind(store_sites: list[str], num_layers: int) -> dict[str, list[str]]:
  """The store's resolved site names split back into MLP and residual, in --layers order."""
  if len(store_sites) != len(KINDS) * num_layers:
    raise ValueError(f"the depth store has {len(store_sites)} sites {store_sites}; expected "
                     f"{len(KINDS) * num_layers} ({', '.join(KINDS)} at {num_layers} layers): "
                     "it was written for other --layers; remove it or pass another --out")
  return {kind: store_sites[i * num_layers:(i + 1) * num_layers]
          for i, kind in enumerate(KINDS)}


def row(kind: str, site: str, last_layer: int, shared: dict, decoder: dict,
        series: dict) -> dict:
  """One (site, layer) point: relative depth is the layer over the deepest one extracted
  (the model's last when --layers ends at -1, as the paper's figure runs first to last)."""
  layer = layer_of(site)
  return {"kind": kind, "site": site, "layer": layer,
          "depth": layer / last_layer if last_layer else 0.0,
          "mean": shared["mean"], "std": shared["std"], "pairs": shared["pairs"],
          "both_above": shared, "decoder": decoder, **series}


def outliers(x: np.ndarray) -> dict:
  """How much a few rows and one dimension dominate a site's activations (rows x d_in): the
  largest dimension's share of the centred variance, and the fraction of rows whose norm is
  over MASSIVE x the median. A residual stream with massive activations (SmolLM2's from layer
  12 on: each window's first token, ~100x the others' norm along one dimension) puts nearly
  all of an FVU loss's weight on reconstructing those rows along it."""
  x = np.asarray(x, np.float64)
  var = ((x - x.mean(0)) ** 2).sum(0)
  norms = np.linalg.norm(x, axis=1)
  median = float(np.median(norms))
  return {"top_dim_variance": float(var.max() / var.sum()) if var.sum() else 0.0,
          "massive_rows": float((norms > MASSIVE * median).mean()),
          "max_norm_over_median": float(norms.max() / median) if median else float("inf")}


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _line(ax, rows, key, **kw):
  got = [r[key] for r in rows if r.get(key)]
  ax.errorbar([r["depth"] for r in rows if r.get(key)], [g["mean"] for g in got],
              yerr=[g["std"] for g in got], capsize=3, **kw)


def _axis(ax, ylabel):
  ax.set_xlabel("relative depth (layer / last layer)")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  ax.set_xlim(-0.03, 1.03)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def plot_layers(rows: list[dict], paper: dict, label: str, path: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.2), dpi=120)
  _line(axes[0], rows, "both_above", fmt="o-", color="C0", label=label)
  for (size, ys), gray in zip(sorted(paper.items()), ("0.75", "0.55", "0.3")):
    axes[0].plot(np.arange(len(ys)) / (len(ys) - 1), ys, "s--", color=gray, markersize=4,
                 label=f"paper, Pythia-160M, {size:,} latents")
  _axis(axes[0], f"fraction shared ({RULE_LAYERS}, 0.7)")
  axes[0].set_title("Sharing across seeds by layer (MLP output)")
  _line(axes[1], rows, "bijections_agree", fmt="o-", color="C2", label=label)
  _axis(axes[1], "fraction whose bijections agree (no threshold)")
  _line(axes[2], rows, "decoder_mcc", fmt="o-", color="C0", label="decoder")
  _line(axes[2], rows, "encoder_mcc", fmt="o--", color="C1", label="encoder")
  _axis(axes[2], "mean matched cosine (PW-MCC)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_sites(rows: list[dict], paper: dict, label: str, path: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(18, 4.2), dpi=120)
  ax = axes[0]
  by = {k: sorted((r for r in rows if r["kind"] == k), key=lambda r: r["layer"]) for k in KINDS}
  layers = [r["layer"] for r in by["mlp"]]
  groups = [f"L{layer}" for layer in layers] + list(paper)
  xs = np.arange(len(groups))
  for i, (kind, color) in enumerate(zip(("resid", "mlp"), ("C3", "C0"))):
    ours = [r["decoder"]["mean"] for r in by[kind]] + [np.nan] * len(paper)
    err = [r["decoder"]["std"] for r in by[kind]] + [0] * len(paper)
    ax.bar(xs[:len(layers)] + (i - 0.5) * 0.38, ours[:len(layers)], 0.38, yerr=err[:len(layers)],
           capsize=2, color=color, label=f"{label}, {kind}")
    ax.bar(xs[len(layers):] + (i - 0.5) * 0.38, [paper[m][kind] for m in paper], 0.38,
           color=color, alpha=0.4, hatch="//", label=f"paper, {kind} (36x, k = 32)")
  ax.set_xticks(xs, groups, rotation=30, fontsize=8)
  ax.set_ylabel(f"fraction shared ({RULE_SITES} rule, 0.7)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=7)
  ax.set_title("Residual stream against MLP output")
  for kind, style in (("mlp", "-"), ("resid", "--")):
    _line(axes[1], by[kind], "both_above", fmt="o" + style, color="C0",
          label=f"{kind}: shared (both_above)")
    _line(axes[1], by[kind], "bijections_agree", fmt="^" + style, color="C2",
          label=f"{kind}: agree (no threshold)")
    _line(axes[2], by[kind], "decoder_mcc", fmt="o" + style, color="C0",
          label=f"{kind}: decoder")
    _line(axes[2], by[kind], "encoder_mcc", fmt="^" + style, color="C1",
          label=f"{kind}: encoder")
  _line(axes[1], [{**r, "outlier": {"mean": r["outliers"]["top_dim_variance"], "std": 0.0}}
                  for r in by["resid"] if "outliers" in r], "outlier", fmt="x:", color="0.3",
        label="resid: top dimension's share of variance")
  _axis(axes[1], "fraction of latents")
  _axis(axes[2], "mean matched cosine (PW-MCC)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
