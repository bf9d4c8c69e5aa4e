"""How stable each latent is across S seeds, and the groups of latents that are one feature.

Built from the pairwise matches alone (match.py hands over each pair's per-latent columns):

  shared_with   in how many of the other S-1 SAEs the latent is shared, under the match's
                headline rule and threshold; found_in = 1 + shared_with (the paper's census)
  dec_cos_mean  its mean cosine to its partner in the optimal decoder bijection of each other
  enc_cos_mean  SAE (and encoder bijection), over the SAEs where it has a partner
  group         the feature it belongs to across all S seeds; group_size, the seeds in it

An edge joins latent i of `a` and its decoder-bijection partner in `b` when i is shared under
the rule (for `agree` and `decoder` exactly the pair's shared latents of both sides; for
`both_above` and `max_cos`, whose partners may differ, the decoder partner stands for both).
Groups are the connected pieces of those edges, with one rule for the conflicts that
non-transitive bijections make (a~b and b~c shared, a~c' shared with c' != c):

  **A group holds at most one latent of each SAE.** Edges are taken strongest first (decoder
  cosine, ties by SAE and latent index); an edge that would put two latents of one SAE into one
  group is refused and counted as a conflict. So a conflicting triple keeps its two strongest
  edges, and the weakest latent stays in a group of its own.

`conflicts` counts refused edges, `groups_with_conflict` the groups a refused edge touched.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jaxsae import files

STABILITY_FILE = "stability.csv"
COLUMNS = ("sae", "name", "latent", "found_in", "shared_with", "dec_cos_mean", "enc_cos_mean",
           "group", "group_size", "group_conflict")


def _inverse(partner: np.ndarray, n_other: int) -> np.ndarray:
  """For each latent of the other side, the latent matched to it (-1 where none is)."""
  inv = np.full(n_other, -1, np.int64)
  ok = partner >= 0
  inv[partner[ok]] = np.nonzero(ok)[0]
  return inv


def _seen_from_b(partner: np.ndarray, cos: np.ndarray, n_b: int) -> np.ndarray:
  """The cosine each latent of b has with its partner in a (NaN where it has none)."""
  inv = _inverse(partner, n_b)
  return np.where(inv >= 0, cos[np.maximum(inv, 0)], np.nan)


def stability(widths: Sequence[int], pairs: Sequence[tuple[int, int, dict]]) -> dict:
  """Per-latent stability and groups of S SAEs from their pairwise matches.

  Args:
    widths: n_latents of each SAE.
    pairs: (i, j, cols) for every pair, cols as `match.match_pair` gives them for a = SAE i:
      enc_partner, enc_cos, dec_partner, dec_cos (a's latents) and `shared` (the headline rule).

  Returns {"per_sae": [per latent column -> array] for each SAE, "conflicts": int,
  "groups_with_conflict": int, "num_groups": int, "edges": int}.
  """
  offset = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
  shared_with = [np.zeros(n, np.int64) for n in widths]
  cos_sum = {side: [np.zeros(n) for n in widths] for side in ("dec", "enc")}
  cos_cnt = {side: [np.zeros(n, np.int64) for n in widths] for side in ("dec", "enc")}
  edges = []  # (weight, node_a, node_b)
  for i, j, cols in pairs:
    for side in ("dec", "enc"):
      c_a = np.asarray(cols[f"{side}_cos"], np.float64)
      c_b = _seen_from_b(np.asarray(cols[f"{side}_partner"]), c_a, widths[j])
      for s, c in ((i, c_a), (j, c_b)):
        has = ~np.isnan(c)
        cos_sum[side][s][has] += c[has]
        cos_cnt[side][s] += has
    partner = np.asarray(cols["dec_partner"])
    lat = np.nonzero(np.asarray(cols["shared"], bool) & (partner >= 0))[0]
    shared_with[i][lat] += 1
    shared_with[j][partner[lat]] += 1
    w = np.asarray(cols["dec_cos"], np.float64)[lat]
    edges.append(np.stack([w, offset[i] + lat, offset[j] + partner[lat]], 1))
  roots, refused = _groups(np.concatenate(edges) if edges else np.zeros((0, 3)), offset)
  # Groups numbered 0, 1, ... in the order of their first latent (SAE by SAE).
  _, groups = np.unique(roots, return_inverse=True)
  size = np.bincount(groups)
  conflict = np.zeros(len(size), bool)
  conflict[groups[refused.ravel()]] = True
  per_sae = []
  for s, n in enumerate(widths):
    g = groups[offset[s]:offset[s + 1]]
    mean = {side: np.where(cos_cnt[side][s] > 0, cos_sum[side][s] /
                           np.maximum(cos_cnt[side][s], 1), np.nan) for side in ("dec", "enc")}
    per_sae.append({"latent": np.arange(n), "found_in": 1 + shared_with[s],
                    "shared_with": shared_with[s], "dec_cos_mean": mean["dec"],
                    "enc_cos_mean": mean["enc"], "group": g, "group_size": size[g],
                    "group_conflict": conflict[g]})
  return {"per_sae": per_sae, "edges": int(sum(len(e) for e in edges)),
          "conflicts": int(len(refused)), "groups_with_conflict": int(conflict.sum()),
          "num_groups": int(len(size)), "group_sizes": size}


def _groups(edges: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(root of every node, its group's first node; refused edges [c, 2]): union-find over the
  edges strongest first, refusing a union of two groups that share an SAE."""
  num_nodes = int(offset[-1])
  parent = list(range(num_nodes))
  sae_of = np.searchsorted(offset, np.arange(num_nodes), side="right") - 1
  members = [1 << int(s) for s in sae_of]  # each group's SAEs as a bit set (root only)

  def find(x: int) -> int:
    root = x
    while parent[root] != root:
      root = parent[root]
    while parent[x] != root:
      parent[x], x = root, parent[x]
    return root

  # Strongest first; ties by the nodes, so the groups are a pure function of the matches.
  order = np.lexsort((edges[:, 2], edges[:, 1], -edges[:, 0])) if len(edges) else []
  refused = []
  for e in order:
    a, b = int(edges[e, 1]), int(edges[e, 2])
    ra, rb = find(a), find(b)
    if ra == rb:
      continue
    if members[ra] & members[rb]:
      refused.append((a, b))
      continue
    lo, hi = min(ra, rb), max(ra, rb)
    parent[hi] = lo  # the smaller root stays: a group is named by its first node
    members[lo] |= members[hi]
  roots = np.array([find(x) for x in range(num_nodes)], np.int64)
  return roots, np.array(refused, np.int64).reshape(-1, 2)


def summary(result: dict, names: Sequence[str], rule: str, threshold: float) -> dict:
  """match.json's `stability`: the groups by size, the conflicts, the census of every SAE."""
  s_total = len(names)
  per, sizes = result["per_sae"], result["group_sizes"]
  mean_width = float(np.mean([len(p["group"]) for p in per]))
  return {
      "file": STABILITY_FILE, "rule": rule, "threshold": threshold, "edges": result["edges"],
      "num_groups": result["num_groups"],
      "groups_by_size": {str(c): int((sizes == c).sum()) for c in range(1, s_total + 1)},
      "conflicts": result["conflicts"],
      "groups_with_conflict": result["groups_with_conflict"],
      # Every distinct feature the seeds found between them, in widths of one SAE (the mean).
      "distinct_per_width": result["num_groups"] / mean_width,
      "found_in_counts": {n: {str(c): int((p["found_in"] == c).sum())
                              for c in range(1, s_total + 1)} for n, p in zip(names, per)},
  }


def write(path: str, result: dict, names: Sequence[str]) -> None:
  """stability.csv: one row per latent of every SAE, SAEs in match.json's order."""
  import pandas as pd
  frames = [pd.DataFrame({"sae": s, "name": name, **cols})[list(COLUMNS)]
            for s, (name, cols) in enumerate(zip(names, result["per_sae"]))]
  text = pd.concat(frames, ignore_index=True).to_csv(index=False, float_format="%.7g")
  files.atomic_write_bytes(path, text.encode())


def read(match_dir: str):
  """stability.csv of a match directory as a DataFrame, or None where the match predates it."""
  import pandas as pd
  path = os.path.join(match_dir, STABILITY_FILE)
  return pd.read_csv(path) if os.path.isfile(path) else None
