"""Analyses and figures of the studies the paper left open (experiments/run.py trains and matches).

Pure functions of `jaxsae match` outputs (match.json, latents.csv, frequencies.npy), so each
can be checked on a hand-made table:

  census        in how many of S seeds each latent is found (the paper's nine-seed figure)
  pair_kinds    pairs of an init x data grid, by what differs: initialisation, data order, both
  nested        sharing per Matryoshka nesting group, and per equal-size frequency rank group
                of a flat SAE for comparison
"""

from __future__ import annotations

import re

import numpy as np

# The paper's nine-seed census (Paulo & Belrose 2025, section 4), read off its figures: of one
# SAE's latents, the fraction found in exactly n of the nine (n = 1..9), and the fraction found
# in no other SAE as SAEs are added (2..9 compared, the base among them).
PAPER_CENSUS = {"num_saes": 9, "only_one": 0.348, "all": 0.173,
                "found_in": [0.348, 0.0782, 0.064, 0.060, 0.0589, 0.0632, 0.0685, 0.0865, 0.173],
                "only_base": {"num_saes": [2, 3, 4, 5, 6, 7, 8, 9],
                              "fraction": [0.58, 0.48, 0.44, 0.41, 0.39, 0.37, 0.36, 0.35]}}


def _inverse(partner: np.ndarray, n_other: int) -> np.ndarray:
  """For each latent of the other side, the latent matched to it (-1 where none is)."""
  inv = np.full(n_other, -1, dtype=np.int64)
  ok = partner >= 0
  inv[partner[ok]] = np.nonzero(ok)[0]
  return inv


def shared_flags(pair, side: str, rule: str, threshold: float, n_other: int | None = None):
  """Shared flags of one pair's latents, seen from its `a` or its `b` SAE.

  `pair` holds one pair's rows of latents.csv (a-side latents in order). Seen from b, a latent
  j takes the cosines of the a-latents each assignment matched to it; under the assignments'
  bijection this is the same verdict the match would give with a and b swapped.
  """
  enc_p = pair["enc_partner"].to_numpy()
  dec_p = pair["dec_partner"].to_numpy()
  enc_c = pair["enc_cos"].to_numpy()
  dec_c = pair["dec_cos"].to_numpy()
  if side == "b":
    n_b = n_other if n_other is not None else len(enc_p)
    ie, idx = _inverse(enc_p, n_b), _inverse(dec_p, n_b)
    enc_c = np.where(ie >= 0, enc_c[np.maximum(ie, 0)], -np.inf)
    dec_c = np.where(idx >= 0, dec_c[np.maximum(idx, 0)], -np.inf)
    enc_p, dec_p = ie, idx
  above_e, above_d = enc_c >= threshold, dec_c >= threshold
  if rule == "agree":
    return (enc_p == dec_p) & (enc_p >= 0) & above_e & above_d
  if rule == "both_above":
    return above_e & above_d
  if rule == "decoder":
    return above_d
  if rule == "encoder":
    return above_e
  raise ValueError(f"unknown rule {rule}")


def census(summary: dict, table, rule: str = "both_above") -> dict:
  """In how many of the S SAEs each latent is found, with every seed in turn as the base.

  match.json's own `seeds` block takes the first seed as the base; here the spread over bases
  is the error bar, and `found_in[c]` is the fraction of a base's latents found in exactly c
  of the S SAEs (the base included).
  """
  names = [s["name"] for s in summary["saes"]]
  s_total, threshold = len(names), summary["threshold"]
  n = {s["name"]: None for s in summary["saes"]}
  by_pair = {key: grp.sort_values("latent") for key, grp in table.groupby(["a", "b"])}
  for (a, b), grp in by_pair.items():
    n[a] = len(grp)
  per_base = []
  for base in names:
    counts = None
    for other in names:
      if other == base:
        continue
      if (base, other) in by_pair:
        f = shared_flags(by_pair[(base, other)], "a", rule, threshold)
      else:
        f = shared_flags(by_pair[(other, base)], "b", rule, threshold,
                         n_other=n[base] or len(by_pair[(other, base)]))
      counts = f.astype(int) if counts is None else counts + f
    found = 1 + counts
    per_base.append([float(np.mean(found == c)) for c in range(1, s_total + 1)])
  per_base = np.array(per_base)
  return {
      "num_saes": s_total, "rule": rule, "threshold": threshold,
      "found_in": [{"count": c + 1, "mean": float(per_base[:, c].mean()),
                    "std": float(per_base[:, c].std())} for c in range(s_total)],
      "only_one": {"mean": float(per_base[:, 0].mean()), "std": float(per_base[:, 0].std())},
      "all": {"mean": float(per_base[:, -1].mean()), "std": float(per_base[:, -1].std())},
      "per_base": {name: [float(v) for v in row] for name, row in zip(names, per_base)},
  }


_MEMBER = re.compile(r"seed(\d+)_data(\d+)")


def pair_kinds(summary: dict, rules=("both_above", "decoder")) -> dict[str, dict]:
  """Pairs of an init x data grid (`seed{I}_data{D}` members) grouped by what differs."""
  kinds: dict[str, list[dict]] = {"init": [], "data": [], "both": []}
  for p in summary["pairs"]:
    ma, mb = _MEMBER.fullmatch(p["a"]), _MEMBER.fullmatch(p["b"])
    if not (ma and mb):
      raise ValueError(f"pair {p['a']}-{p['b']} is not of seed{{I}}_data{{D}} members")
    same_init, same_data = ma.group(1) == mb.group(1), ma.group(2) == mb.group(2)
    if same_init and same_data:
      raise ValueError(f"{p['a']} and {p['b']} have the same initialisation and data order")
    kinds["data" if same_init else "init" if same_data else "both"].append(p)
  out = {}
  for kind, pairs in kinds.items():
    row = {"pairs": len(pairs)}
    for rule in rules:
      v = [q["rules"][rule]["fraction_shared"] for q in pairs]
      row[rule] = {"mean": float(np.mean(v)), "std": float(np.std(v))} if v else None
    for name, key in (("bijections_agree", "fraction_agree"), ("decoder_mcc", "decoder_mcc"),
                      ("encoder_mcc", "encoder_mcc")):
      v = [q[key] for q in pairs if key in q]
      row[name] = {"mean": float(np.mean(v)), "std": float(np.std(v))} if v else None
    out[kind] = row
  return out


def mcc(summary: dict, key: str = "decoder_mcc") -> dict | None:
  """Mean and std over pairs of a pair-level mean matched cosine, where match wrote one."""
  v = [p[key] for p in summary["pairs"] if key in p]
  return {"mean": float(np.mean(v)), "std": float(np.std(v))} if v else None


SERIES = ("bijections_agree", "decoder_mcc", "encoder_mcc")  # drawn beside every shared fraction


def series(summary: dict) -> dict:
  """Mean and std over pairs of the threshold-free views of each pair, as match.json has them:
  `bijections_agree` (its fraction_agree: both bijections send a latent to the same partner,
  no threshold; not the `agree` rule, which also asks both cosines >= the threshold) and the
  decoder and encoder PW-MCC."""
  return {name: mcc(summary, key)
          for name, key in zip(SERIES, ("fraction_agree", "decoder_mcc", "encoder_mcc"))}


def rule_point(summary: dict, rule: str) -> dict:
  v = [p["rules"][rule]["fraction_shared"] for p in summary["pairs"]]
  return {"mean": float(np.mean(v)), "std": float(np.std(v)), "pairs": len(v)}


def l0s(freqs: np.ndarray | None) -> list[float] | None:
  """Each SAE's mean active latents per token on the match's token sample: the sum of its
  latents' firing frequencies."""
  return None if freqs is None else [float(v) for v in freqs.sum(axis=1)]


def group_bounds(prefixes) -> list[tuple[int, int]]:
  """Nesting groups [lo, hi) from the prefix ends (the last is the width)."""
  ends = [int(p) for p in prefixes]
  return list(zip([0] + ends[:-1], ends))


def nested(table, summary: dict, bounds, rule: str = "both_above", by_frequency: bool = False,
           freqs: np.ndarray | None = None) -> list[dict]:
  """Fraction shared per group of latents (mean and std over pairs, seen from side a).

  Groups are latent index ranges (a Matryoshka SAE's nesting groups), or with `by_frequency`
  the same sizes over latents ranked by firing frequency, most frequent first: a flat SAE has
  no order of its own, and its frequent latents are the nearest thing to a first group.
  """
  names = [s["name"] for s in summary["saes"]]
  curves = []
  for (a, _), grp in table.groupby(["a", "b"]):
    grp = grp.sort_values("latent")
    flags = shared_flags(grp, "a", rule, summary["threshold"])
    if by_frequency:
      if freqs is None:
        raise ValueError("by_frequency needs the match's frequencies")
      flags = flags[np.argsort(-freqs[names.index(a)], kind="stable")]
    curves.append([float(flags[lo:hi].mean()) for lo, hi in bounds])
  c = np.array(curves)
  return [{"lo": lo, "hi": hi, "mean": float(c[:, g].mean()), "std": float(c[:, g].std())}
          for g, (lo, hi) in enumerate(bounds)]


# ---------------------------------------------------------------------------------------------
# Figures.


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _fraction_axis(ax, ylabel: str, legend: bool = True) -> None:
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  if legend:
    ax.legend(fontsize=8)


def _save(fig, path: str, title: str | None = None) -> None:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)
  _plt().close(fig)


def plot_census(res: dict, seeds: dict | None, path: str, label: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2 if seeds else 1, figsize=(11 if seeds else 6, 4), dpi=120,
                           squeeze=False)
  ax = axes[0, 0]
  rows = res["found_in"]
  ax.bar([r["count"] for r in rows], [r["mean"] for r in rows],
         yerr=[r["std"] for r in rows], capsize=3, label=label)
  if res["num_saes"] == PAPER_CENSUS["num_saes"]:
    ax.plot(range(1, 10), PAPER_CENSUS["found_in"], "s--", color="gray", markersize=6,
            label="paper (Pythia-160M, 9 seeds)")
  ax.set_xticks([r["count"] for r in rows])
  ax.set_xlabel(f"found in how many of the {res['num_saes']} SAEs")
  ax.set_ylabel("fraction of a seed's latents")
  ax.set_title(f"Census of latents over {res['num_saes']} seeds ({res['rule']}, "
               f"{res['threshold']})")
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  if seeds:
    ax = axes[0, 1]
    curve = seeds["fraction_only_base"]
    ax.errorbar([c["num_saes"] for c in curve], [c["mean"] for c in curve],
                yerr=[c["std"] for c in curve], fmt="o-", capsize=3, label=label)
    ref = PAPER_CENSUS["only_base"]
    ax.plot(ref["num_saes"], ref["fraction"], "s--", color="gray", markersize=6,
            label="paper (Pythia-160M)")
    ax.legend(fontsize=8)
    ax.set_xticks([c["num_saes"] for c in curve])
    ax.set_xlabel("SAEs compared (seed 0 among them; random subsets)")
    ax.set_ylabel("fraction of seed 0's latents found in no other")
    ax.set_title(f"Orphans of seed 0 as seeds are added ({seeds.get('rule', 'agree')} rule)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  _save(fig, path)


def plot_trajectory(snapshots: list[dict], full: list[dict], path: str) -> None:
  """Sharing and PW-MCC against tokens: snapshots of one run beside runs of each length."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
  for ax, key, ylabel in ((axes[0], "shared", "fraction shared (both_above, 0.7)"),
                          (axes[1], "decoder_mcc", "mean matched decoder cosine (PW-MCC)")):
    for rows, style, label in ((snapshots, "o-", "snapshots of one run (lr still decaying)"),
                               (full, "s--", "runs that complete their own schedule")):
      rows = [r for r in rows if r.get(key)]
      if rows:
        ax.errorbar([r["tokens"] for r in rows], [r[key]["mean"] for r in rows],
                    yerr=[r[key]["std"] for r in rows], fmt=style, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training tokens per seed")
    _fraction_axis(ax, ylabel)
  _save(fig, path, "When do seeds diverge?")


def plot_kinds(kinds: dict, path: str) -> None:
  plt = _plt()
  order = ["init", "data", "both"]
  labels = {"init": "initialisation\nonly", "data": "data order\nonly", "both": "both"}
  fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=120)
  for ax, key, ylabel in ((axes[0], "both_above", "fraction shared (both_above, 0.7)"),
                          (axes[1], "decoder_mcc", "mean matched decoder cosine (PW-MCC)"),
                          (axes[2], "encoder_mcc", "mean matched encoder cosine")):
    vals = [kinds[k][key] for k in order]
    xs = [i for i, v in enumerate(vals) if v]
    ax.bar(xs, [vals[i]["mean"] for i in xs], yerr=[vals[i]["std"] for i in xs], capsize=4)
    ax.set_xticks(range(3), [f"{labels[k]}\n({kinds[k]['pairs']} pairs)" for k in order])
    ax.set_xlabel("what differs between the two SAEs")
    _fraction_axis(ax, ylabel, legend=False)
  _save(fig, path, "What makes two seeds differ?")


def plot_arch_l0(rows: list[dict], path: str) -> None:
  """Sharing per architecture at each target L0 (categories: points, no lines)."""
  plt = _plt()
  archs = list(dict.fromkeys(r["arch"] for r in rows))
  targets = sorted({r["l0_target"] for r in rows})
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
  for ax, key, ylabel in ((axes[0], "both_above", "fraction shared (both_above, 0.7)"),
                          (axes[1], "decoder", "fraction shared (decoder only, 0.7)")):
    for j, t in enumerate(targets):
      pts = [(archs.index(r["arch"]) + (j - (len(targets) - 1) / 2) * 0.15, r[key])
             for r in rows if r["l0_target"] == t and r.get(key)]
      if pts:
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                    yerr=[p[1]["std"] for p in pts], fmt="o", capsize=4, label=f"L0 = {t}")
    ax.set_xticks(range(len(archs)), archs)
    _fraction_axis(ax, ylabel)
  _save(fig, path, "Architectures at equal sparsity")


def plot_nested(overall: list[dict], groups: dict[str, list[dict]], path: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
  ax = axes[0]
  ax.errorbar(range(len(overall)), [r["both_above"]["mean"] for r in overall],
              yerr=[r["both_above"]["std"] for r in overall], fmt="o", capsize=4)
  ax.set_xticks(range(len(overall)), [r["arch"] for r in overall])
  _fraction_axis(ax, "fraction shared (both_above, 0.7)", legend=False)
  ax.set_title("Overall, equal width and L0")
  ax = axes[1]
  for name, rows in groups.items():
    ax.errorbar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                fmt="o-" if name == "matryoshka" else "s--", capsize=3, label=name)
  first = next(iter(groups.values()))
  ax.set_xticks(range(len(first)), [f"{r['lo']}-{r['hi']}" for r in first], fontsize=8)
  ax.set_xlabel("latents (Matryoshka: nesting group; flat SAEs: frequency rank)")
  _fraction_axis(ax, "fraction shared (both_above, 0.7)")
  ax.set_title("Per group")
  _save(fig, path)
