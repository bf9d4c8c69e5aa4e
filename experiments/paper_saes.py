"""The paper's own SAEs, recomputed: Paulo & Belrose's released SAEs matched by `jaxsae match`.

  python -m experiments.run --study=paper_saes --paper_repo=EleutherAI/sae_overlap \
      --paper_revision=main

The SAEs are read from the Hub in sparsify's layout, one folder per run and one per hookpoint
inside it (hf://EleutherAI/sae_overlap/k32-sae-mlp-768/layers.6.mlp); seed 1 of the 32K run
is its own repository (hf://EleutherAI/sae-pythia-160m-32k). Every pair goes through
`match.run` with the paper's rule: both_above, shared when the encoder and the decoder partner
cosines are both > 0.7 (strict, as its notebook; --nopaper_strict: jaxsae's >=), cosines in
blocks of 4,096 rows. Parts:

  size    seed 1 against seed 2 at layer 6, for each dictionary size (32 ... 131K latents)
  k       the same at 32K latents, for k = 32 ... 256
  census  seed 1 of the 32K run against the other eight: how many of seed 1's latents are
          shared with all eight (found in all nine) and with none (seed 1 alone)
  layers  seed 1 against seed 2 at every hookpoint both hold, for 768, 4K and 32K latents

The run folders' names are the brief's (see experiments/README.md, "The paper's SAEs,
recomputed", for what is inferred); a point whose SAEs cannot be found is recorded under
`missing` and the rest go on. Each pair's match directory is reused by every part that needs it
and by a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from experiments import open_questions as oq
from jaxsae import hub
from jaxsae import match
from jaxsae import saes as saes_lib
from jaxsae.errors import JaxsaeError

REPO = "EleutherAI/sae_overlap"
SEED1_32K = "hf://EleutherAI/sae-pythia-160m-32k"
HOOKPOINT = "layers.6.mlp"
THRESHOLD = 0.7
# The notebook computed its cosine matrices 4,096 rows at a time; jaxsae's kernel takes the
# same block, and solves one exact assignment over all rows either way.
BLOCK_ROWS = 4096
PARTS = ("size", "k", "census", "layers")
# Run-name suffix -> latents, as the folders are named (4k is 4,096, 131k is 2^17).
SIZES = {"32": 32, "768": 768, "4k": 4096, "32k": 32768, "131k": 131072}
KS = (32, 64, 128, 256)
LAYER_SIZES = ("768", "4k", "32k")  # the sizes of the paper's layer figure
CENSUS_SEEDS = 9
# The notebook's census output for seed 1 of the 32K run against the other eight.
PAPER_CENSUS_COUNTS = {"num_latents": 32768, "in_all": 5647, "alone": 11512}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the paper's SAEs are and how they are matched."""
  repo: str = REPO
  revision: str | None = None  # None: the default branch
  seed1_32k: str = SEED1_32K  # hf://OWNER/REPO[@REVISION] of seed 1 of the 32K run
  hookpoint: str = HOOKPOINT
  strict: bool = True


@dataclasses.dataclass(frozen=True)
class Seed:
  """One SAE run: a folder of a repo (or a repo's root), hookpoint folders inside."""
  repo: str
  run: str
  revision: str | None

  def spec(self, hookpoint: str = "") -> str:
    sub = "/".join(p for p in (self.run, hookpoint) if p)
    return str(hub.Spec(self.repo, sub, self.revision))


def run_name(size: str = "32k", k: int = 32, seed: int = 1) -> str:
  """The repository folder of a run, by the names the release uses (k32-sae-mlp-4k-seed2)."""
  return f"k{k}-sae-mlp-{size}" + ("" if seed == 1 else f"-seed{seed}")


def seed_of(src: Source, size: str = "32k", k: int = 32, seed: int = 1) -> Seed:
  if (size, k, seed) == ("32k", 32, 1):
    # Seed 1 of the 32K run was released on its own, before the others.
    spec = hub.parse(src.seed1_32k)
    return Seed(spec.repo_id, spec.subfolder, spec.revision)
  return Seed(src.repo, run_name(size, k, seed), src.revision)


def pair_name(a: Seed, b: Seed, hookpoint: str) -> str:
  """A match directory's name: both runs and the hookpoint, safe as one path part."""
  tag = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s.run or s.repo.split("/")[-1])
  return f"{tag(a)}--{tag(b)}--{hookpoint}"


def match_config(inputs: tuple[str, ...], out: str, strict: bool) -> match.MatchConfig:
  # No activation store is named in sparsify's cfg.json, so nothing is measured on tokens.
  return match.MatchConfig(inputs=inputs, out=out, threshold=THRESHOLD, strict=strict,
                           definition="both_above", block_size=BLOCK_ROWS, freq_tokens=0)


def matched(cfg: match.MatchConfig) -> match.MatchResult:
  """`jaxsae match` of cfg, reused where a complete match with the same settings is there."""
  path = os.path.join(cfg.out, match.SUMMARY_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f).get("config")
    if old == json.loads(json.dumps(dataclasses.asdict(cfg))):
      return match.read(cfg.out)
  match.run(cfg)
  return match.read(cfg.out)


def pair_point(result: match.MatchResult) -> dict:
  """What the figures draw of one matched pair: the paper's rule, its neighbours, PW-MCC."""
  p = result.summary["pairs"][0]
  return {"a": p["a"], "b": p["b"], "n_latents": p["n_a"],
          "n_shared": p["rules"]["both_above"]["n_shared"],
          "shared": p["rules"]["both_above"]["fraction_shared"],
          "decoder_rule": p["rules"]["decoder"]["fraction_shared"],
          "agree_rule": p["rules"]["agree"]["fraction_shared"],
          "bijections_agree": p["fraction_agree"],
          "decoder_mcc": p["decoder_mcc"], "encoder_mcc": p["encoder_mcc"],
          "match": result.directory}


def census_counts(flags: np.ndarray) -> dict:
  """Seed 1's census from its shared flags against each other seed ([S-1, n] bool)."""
  found_in = 1 + flags.sum(0)
  s_total, n = flags.shape[0] + 1, flags.shape[1]
  counts = {str(c): int((found_in == c).sum()) for c in range(1, s_total + 1)}
  return {"num_saes": s_total, "num_latents": n, "found_in_counts": counts,
          "in_all": counts[str(s_total)], "alone": counts["1"],
          "found_in": [counts[str(c)] / n for c in range(1, s_total + 1)]}


def hookpoints(seed: Seed) -> list[str]:
  """The hookpoint folders of a run, in natural order (layers.2 before layers.10)."""
  root = hub.resolve(seed.spec())
  rel = [os.path.relpath(p, root) for p in saes_lib.discover([seed.spec()])]
  return ["" if r == "." else r for r in rel]  # "": the run's folder is itself one SAE


def layer_of(hookpoint: str) -> int | None:
  m = re.search(r"layers\.(\d+)", hookpoint)
  return int(m.group(1)) if m else None


class Matcher:
  """Matches pairs of seeds into OUT/matches, recording the points it could not find."""

  def __init__(self, out: str, strict: bool):
    self.out, self.strict, self.missing = os.path.join(out, "matches"), strict, []

  def pair(self, what: str, a: Seed, b: Seed, hookpoint: str) -> dict | None:
    cfg = match_config((a.spec(hookpoint), b.spec(hookpoint)),
                       os.path.join(self.out, pair_name(a, b, hookpoint)), self.strict)
    try:
      return pair_point(matched(cfg))
    except JaxsaeError as e:
      # The layout is partly inferred: one absent run must not cost the others.
      self.missing.append({"point": what, "inputs": list(cfg.inputs), "error": str(e)})
      return None


def size_rows(src: Source, m: Matcher, progress) -> list[dict]:
  rows = []
  for size in progress(SIZES, desc="size"):
    got = m.pair(f"size {size}", seed_of(src, size), seed_of(src, size, seed=2), src.hookpoint)
    if got:
      rows.append({"run": run_name(size), "nominal_latents": SIZES[size], **got})
  return rows


def k_rows(src: Source, m: Matcher, progress) -> list[dict]:
  rows = []
  for k in progress(KS, desc="k"):
    got = m.pair(f"k {k}", seed_of(src, k=k), seed_of(src, k=k, seed=2), src.hookpoint)
    if got:
      rows.append({"run": run_name(k=k), "k": k, **got})
  return rows


def census(src: Source, m: Matcher, progress) -> dict | None:
  """Seed 1 of the 32K run against each of the other eight, one match each (the notebook's
  eight pairs, not all 36)."""
  base, flags, pairs = seed_of(src), [], []
  for s in progress(range(2, CENSUS_SEEDS + 1), desc="census"):
    got = m.pair(f"census seed {s}", base, seed_of(src, seed=s), src.hookpoint)
    if got is None:
      return None
    table = match.read(got["match"]).latents.sort_values("latent")
    flags.append(table["shared_both_above"].to_numpy(bool))
    pairs.append(got)
  if len({len(f) for f in flags}) != 1:
    raise JaxsaeError(f"the census's nine SAEs differ in width ({[len(f) for f in flags]}); "
                      "check --paper_seed1 and --paper_repo")
  return {**census_counts(np.stack(flags)), "pairs": pairs}


def layer_rows(src: Source, m: Matcher, progress) -> list[dict]:
  rows = []
  for size in LAYER_SIZES:
    a, b = seed_of(src, size), seed_of(src, size, seed=2)
    try:
      in_b = set(hookpoints(b))
      hooks = [h for h in hookpoints(a) if h in in_b]
    except JaxsaeError as e:
      m.missing.append({"point": f"layers {size}", "inputs": [a.spec(), b.spec()],
                        "error": str(e)})
      continue
    for hook in progress(hooks, desc=f"layers {size}"):
      got = m.pair(f"layers {size} {hook}", a, b, hook)
      if got:
        rows.append({"run": run_name(size), "nominal_latents": SIZES[size], "hookpoint": hook,
                     "layer": layer_of(hook), **got})
  return rows


def summary_rows(res: dict) -> list[dict]:
  """One line per point for run.py's printout: x, mean (the shared fraction), std (one pair)."""
  rows = [{"x": f"{r['run']} ({r['n_latents']})", "mean": r["shared"], "std": 0.0}
          for r in res.get("size", [])]
  rows += [{"x": r["run"], "mean": r["shared"], "std": 0.0} for r in res.get("k", [])]
  if res.get("census"):
    c = res["census"]
    rows += [{"x": "census in all", "mean": c["in_all"] / c["num_latents"], "std": 0.0},
             {"x": "census alone", "mean": c["alone"] / c["num_latents"], "std": 0.0}]
  rows += [{"x": f"{r['run']} {r['hookpoint']}", "mean": r["shared"], "std": 0.0}
           for r in res.get("layers", [])]
  return rows


def plot(res: dict, paper: dict, path: str) -> None:
  """Four panels, each value recomputed from the released SAEs beside the one read off the
  paper's figure."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), dpi=120)
  rule = res["rule"]
  ours = "recomputed (released SAEs)"
  for ax, part, key, xlabel in ((axes[0, 0], "size", "n_latents", "latents"),
                                (axes[0, 1], "k", "k", "k (32K latents)")):
    rows = res.get(part) or []
    ax.plot([r[key] for r in rows], [r["shared"] for r in rows], "o-", label=ours)
    ax.plot([r[key] for r in rows], [r["decoder_mcc"] for r in rows], "^:", color="C2",
            label="recomputed decoder PW-MCC")
    ref = paper[part]
    ax.plot(ref["x"], ref["y"], "s--", color="gray", label="paper's figure")
    ax.plot(ref["x"], ref["decoder_mcc"], "v:", color="gray", alpha=0.6,
            label="paper's decoder PW-MCC")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"fraction shared ({rule})")
  ax = axes[1, 0]
  by_size = {}
  for r in res.get("layers") or []:
    by_size.setdefault(r["nominal_latents"], []).append(r)
  for i, (size, ys) in enumerate(sorted(paper["layers"].items())):
    ax.plot(range(len(ys)), ys, "s--", color=f"C{i}", alpha=0.5, label=f"paper, {size:,}")
    got = sorted(by_size.get(size, []), key=lambda r: r["layer"])
    if got:
      ax.plot([r["layer"] for r in got], [r["shared"] for r in got], "o-", color=f"C{i}",
              label=f"recomputed, {size:,}")
  ax.set_xlabel("layer (MLP output)")
  ax.set_ylabel(f"fraction shared ({rule})")
  ax = axes[1, 1]
  ref = paper["census"]
  ax.plot(range(1, len(ref["found_in"]) + 1), ref["found_in"], "s--", color="gray",
          label="paper's figure")
  c = res.get("census")
  if c:
    ax.bar(range(1, c["num_saes"] + 1), c["found_in"], alpha=0.7,
           label=f"recomputed: {c['in_all']:,} in all, {c['alone']:,} alone")
  counts = PAPER_CENSUS_COUNTS
  ax.set_title(f"paper's notebook: {counts['in_all']:,} in all nine, {counts['alone']:,} in "
               f"seed 1 alone (of {counts['num_latents']:,})", fontsize=9)
  ax.set_xlabel("found in how many of the nine 32K SAEs (seed 1 as base)")
  ax.set_ylabel("fraction of seed 1's latents")
  for ax in axes.flat:
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"Paulo & Belrose's released SAEs, matched by jaxsae ({rule})")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def study(out: str, src: Source, paper: dict, png: str, parts=PARTS,
          progress: bool = True) -> dict:
  """Every part asked for, matched into OUT/matches, drawn into `png`.

  `paper`: the values read off the paper's figures, {size, k: run.py's PAPER entries, layers:
  {latents: [per layer]}, census: open_questions.PAPER_CENSUS}.
  """
  from tqdm import tqdm
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise JaxsaeError(f"--paper_parts: no part {', '.join(sorted(unknown))}; use some of "
                      f"{', '.join(PARTS)}")
  bar = lambda it, desc: tqdm(list(it), desc=desc, unit="pair", disable=not progress)
  m = Matcher(out, src.strict)
  rule = f"both_above, cosines {'>' if src.strict else '>='} {THRESHOLD}"
  res = {"rule": rule, "source": dataclasses.asdict(src), "block_rows": BLOCK_ROWS}
  todo = {"size": size_rows, "k": k_rows, "census": census, "layers": layer_rows}
  for part in PARTS:
    if part in parts:
      res[part] = todo[part](src, m, bar)
  res["missing"] = m.missing
  res["paper"] = {**paper, "census_counts": PAPER_CENSUS_COUNTS}
  plot(res, res["paper"], png)
  res["rows"] = summary_rows(res)
  for miss in m.missing:
    print(f"paper_saes: skipped {miss['point']}: {miss['error']}")
  return res


def paper_values(paper: dict, paper_layers: dict) -> dict:
  """run.py's values read off the paper's figures, in the shape `study` draws them."""
  return {"size": paper["size"], "k": paper["k"], "layers": paper_layers,
          "census": oq.PAPER_CENSUS}
