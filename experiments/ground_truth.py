"""The ground-truth study: SAE seeds on activations whose features are known (`jaxsae synth`).

experiments/run.py --study=ground_truth trains S seeds per point and matches their pairs; this
module says which points, measures each against the truth and draws the figure:

  width           SAE width n against the true N: half, equal, double (k = true L0)
  k               k against the true L0: half, equal, double (n = N)
  superposition   N / d = 1, 4, 8, 16 at fixed d and L0 (n = N, k = L0)
  length          training tokens: 1/8, 1/4, 1/2 and all of the base length
  structure       independent features, + hierarchy, + correlated firing, + both

Every point reports seed-against-seed sharing (both_above at 0.7, decoder PW-MCC) beside the
recovery of the truth (the fraction of true features some latent reaches at cosine 0.7 and
0.9, PW-MCC against the true dictionary), and what each orphan latent is in terms of the
truth (`orphan_kinds`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxsae import formats
from jaxsae import match
from jaxsae import saes as saes_lib
from jaxsae import synthetic
from jaxsae import truth as truth_lib

from experiments import open_questions as oq

THRESHOLD = 0.7
ORPHAN_KINDS = ("missed", "both_have_it", "merged", "split", "other")


@dataclasses.dataclass(frozen=True)
class Preset:
  """One scale of the study: the synthetic data and how every point trains."""
  d_in: int
  num_features: int
  l0: float
  store_tokens: int
  train_tokens: int
  batch_size: int
  lr: float
  warmup: int
  superposition: tuple[int, ...]  # N / d
  hierarchy: int  # parents of the hierarchical stores
  branching: int
  correlation: float
  rows_per_shard: int = 16_384  # the generator draws [rows, N] at once: fewer rows for large N


# What a 2-core CPU shared three ways trains in ~15 minutes (the README's numbers).
REDUCED = Preset(d_in=64, num_features=512, l0=8, store_tokens=262_144, train_tokens=1_048_576,
                 batch_size=512, lr=4e-3, warmup=50, superposition=(1, 4, 8, 16), hierarchy=16,
                 branching=4, correlation=0.3)
# SynthSAEBench's default data (16,384 features in d = 768, L0 ~ 34), for an accelerator.
FULL = Preset(d_in=768, num_features=16_384, l0=34, store_tokens=4_194_304,
              train_tokens=100_000_000, batch_size=4096, lr=5e-4, warmup=1000,
              superposition=(2, 8, 21, 42), hierarchy=512, branching=4, correlation=0.3,
              rows_per_shard=2048)
PRESETS = {"reduced": REDUCED, "full": FULL}


def store_spec(p: Preset, **kw) -> dict:
  return {"d_in": p.d_in, "num_features": p.num_features, "l0": p.l0,
          "num_tokens": p.store_tokens, "rows_per_shard": p.rows_per_shard, **kw}


def points(p: Preset) -> list[dict]:
  """Every point of the five sweeps: its sweep, x, the store's and the training's settings."""
  n, k, t = p.num_features, int(round(p.l0)), p.train_tokens
  base = store_spec(p)
  out = []
  for f in (0.5, 1, 2):
    out.append({"sweep": "width", "x": f"n = {f:g} N", "store": base,
                "train": {"num_latents": int(n * f), "k": k, "num_tokens": t}})
  for f in (0.5, 1, 2):
    out.append({"sweep": "k", "x": f"k = {f:g} L0", "store": base,
                "train": {"num_latents": n, "k": max(1, int(k * f)), "num_tokens": t}})
  for r in p.superposition:
    s = store_spec(p, num_features=p.d_in * r)
    out.append({"sweep": "superposition", "x": f"N / d = {r}", "store": s,
                "train": {"num_latents": p.d_in * r, "k": k, "num_tokens": t}})
  for f in (8, 4, 2, 1):
    tokens = t // f // p.batch_size * p.batch_size
    out.append({"sweep": "length", "x": f"{tokens:,} tokens", "store": base,
                "train": {"num_latents": n, "k": k, "num_tokens": tokens}})
  hier = {"hierarchy": p.hierarchy, "branching": p.branching}
  corr = {"correlation": p.correlation}
  for name, extra in (("independent", {}), ("hierarchy", hier), ("correlation", corr),
                      ("both", {**hier, **corr})):
    out.append({"sweep": "structure", "x": name, "store": store_spec(p, **extra),
                "train": {"num_latents": n, "k": k, "num_tokens": t}})
  return out


def store_name(spec: dict) -> str:
  parts = [f"d{spec['d_in']}", f"N{spec['num_features']}", f"l0{spec['l0']:g}"]
  parts += [f"h{spec['hierarchy']}x{spec['branching']}"] if spec.get("hierarchy") else []
  parts += [f"c{spec['correlation']:g}"] if spec.get("correlation") else []
  return "_".join(parts)


def synth_store(root: str, spec: dict, seed: int = 0) -> str:
  path = os.path.join(root, "stores", store_name(spec))
  if not os.path.exists(os.path.join(path, "manifest.json")):
    synthetic.run(synthetic.SynthConfig(out=path, seed=seed, **spec))
  return path


def run_name(train: dict) -> str:
  return f"n{train['num_latents']}_k{train['k']}_t{train['num_tokens']}"


# ---------------------------------------------------------------------------------------------
# Measurements of one point.


def recovery(run_dir: str, truth_dir: str) -> dict:
  """Each seed's recovery of the truth, and mean and std over the seeds."""
  truth = formats.load_sae(truth_dir).W_dec
  per = [truth_lib.recovery(formats.load_sae(p).W_dec, truth)
         for p in saes_lib.discover([run_dir])]
  out = {}
  for key in ("recovered_0.7", "recovered_0.9", "mcc"):
    v = [r[key] for r in per]
    out[key] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": v}
  return out


def orphan_kinds(match_dir: str, truth_dir: str, rule: str = "both_above") -> dict:
  """What the orphans of every pair are, seen from both SAEs of the pair, in terms of the truth.

  An orphan latent aligned with a true feature (cosine >= 0.7) is `missed` when the other seed
  has no latent at 0.7 to that feature, else `both_have_it` (both seeds learnt the feature, the
  matching still does not pair them at 0.7 in encoder and decoder); an unaligned orphan is
  `merged`, `split` or `other` as truth.classify says. Fractions are of all orphans (and
  `orphan_fraction` of all latents), mean over the pair's two sides and over pairs.
  """
  found = match.read(match_dir)
  summary, table = found.summary, found.latents
  paths = {s["name"]: s["path"] for s in summary["saes"]}
  truth = formats.load_sae(truth_dir).W_dec
  dec = {name: formats.load_sae(p).W_dec for name, p in paths.items()}
  kinds = {name: truth_lib.classify(d, truth, THRESHOLD) for name, d in dec.items()}
  has = {name: truth_lib.cosines(d, truth).max(axis=0) >= THRESHOLD for name, d in dec.items()}
  rows = []
  for (a, b), pair in table.groupby(["a", "b"], sort=False):
    for side, me, other in (("a", a, b), ("b", b, a)):
      shared = oq.shared_flags(pair, side, rule, summary["threshold"], len(dec[b]))
      orphan = ~shared
      kind = np.array(truth_lib.KINDS)[kinds[me]["kind"]]
      aligned = kind == "aligned"
      missed = aligned & ~has[other][kinds[me]["nearest"]]
      label = np.where(missed, "missed", np.where(aligned, "both_have_it", kind))
      n_orph = max(int(orphan.sum()), 1)
      rows.append({"orphan_fraction": float(orphan.mean()),
                   **{k: float((label[orphan] == k).sum() / n_orph) for k in ORPHAN_KINDS}})
  return {k: float(np.mean([r[k] for r in rows])) for k in ("orphan_fraction", *ORPHAN_KINDS)}


def point_result(pt: dict, summary: dict, run_dir: str, match_dir: str, truth_dir: str) -> dict:
  return {"sweep": pt["sweep"], "x": pt["x"], "store": pt["store"], "train": pt["train"],
          "shared": oq.rule_point(summary, "both_above"), **oq.series(summary),
          "truth": recovery(run_dir, truth_dir),
          "orphans": orphan_kinds(match_dir, truth_dir), "run": run_dir}


# ---------------------------------------------------------------------------------------------
# The figure.

COLORS = {"width": "C0", "k": "C1", "superposition": "C2", "length": "C3", "structure": "C4"}


def plot(results: list[dict], png: str, title: str) -> None:
  plt = oq._plt()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=120,
                               gridspec_kw={"width_ratios": [1, 1.3]})
  for sweep, color in COLORS.items():
    rs = [r for r in results if r["sweep"] == sweep]
    if not rs:
      continue
    ax.errorbar([r["truth"]["recovered_0.7"]["mean"] for r in rs],
                [r["shared"]["mean"] for r in rs],
                xerr=[r["truth"]["recovered_0.7"]["std"] for r in rs],
                yerr=[r["shared"]["std"] for r in rs], fmt="o", color=color, capsize=3,
                label=sweep)
    for r in rs:
      ax.annotate(r["x"], (r["truth"]["recovered_0.7"]["mean"], r["shared"]["mean"]),
                  fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
  ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="sharing = recovery")
  ax.set_xlim(0, 1.02)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("true features recovered (a decoder row at cosine >= 0.7), mean over seeds")
  ax.set_ylabel("latents shared between seeds (both_above, 0.7), mean over pairs")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  ax.set_title("Seed against seed, against the truth")
  labels = [f"{r['sweep']}: {r['x']}" for r in results]
  left = np.zeros(len(results))
  for j, kind in enumerate(ORPHAN_KINDS):
    v = np.array([r["orphans"][kind] * r["orphans"]["orphan_fraction"] for r in results])
    bx.barh(range(len(results)), v, left=left, color=f"C{j + 5}", label=kind)
    left += v
  bx.set_yticks(range(len(results)), labels, fontsize=7)
  bx.invert_yaxis()
  bx.set_xlim(0, 1)
  bx.set_xlabel("fraction of all latents that are orphans, by what they are in the truth")
  bx.legend(fontsize=8, loc="lower right")
  bx.grid(alpha=0.3, axis="x")
  bx.set_title("Orphans: missed by the other seed, merges, splits")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png)


def table_rows(results: list[dict]) -> list[str]:
  """The README's markdown table, one row per point."""
  out = ["| sweep | point | shared | recovered @0.7 | @0.9 | PW-MCC truth | PW-MCC seeds | "
         "orphans | missed | both have it | merged | split | other |",
         "| --- | --- | " + " | ".join(["---:"] * 11) + " |"]
  for r in results:
    o = r["orphans"]
    out.append(f"| {r['sweep']} | {r['x']} | {r['shared']['mean']:.3f} | "
               f"{r['truth']['recovered_0.7']['mean']:.3f} | "
               f"{r['truth']['recovered_0.9']['mean']:.3f} | {r['truth']['mcc']['mean']:.3f} | "
               f"{r['decoder_mcc']['mean']:.3f} | {o['orphan_fraction']:.3f} | "
               + " | ".join(f"{o[k]:.2f}" for k in ORPHAN_KINDS) + " |")
  return out


def study(root: str, preset: Preset, trained, matched, png: str) -> dict:
  """Every point trained (`trained(group, name, store, **train)`), matched (`matched(run,
  out, **kw)`) and measured against its truth; the figure drawn to `png`."""
  results = []
  for pt in points(preset):
    store = synth_store(root, pt["store"])
    run_dir = trained(os.path.join("ground_truth", os.path.basename(store)),
                      run_name(pt["train"]), store, batch_size=preset.batch_size, lr=preset.lr,
                      lr_warmup_steps=preset.warmup, **pt["train"])
    summary = matched(run_dir, run_dir + "-match", freq_tokens=65_536, scan_tokens=0,
                      importance_tokens=0)
    results.append(point_result(pt, summary, run_dir, run_dir + "-match",
                                os.path.join(store, synthetic.TRUTH_DIR)))
    r = results[-1]
    print(f"{r['sweep']:>13} {r['x']:>18}: shared {r['shared']['mean']:.3f}, recovered "
          f"{r['truth']['recovered_0.7']['mean']:.3f} / {r['truth']['recovered_0.9']['mean']:.3f}"
          f", orphans {r['orphans']['orphan_fraction']:.3f}", flush=True)
  plot(results, png, f"SAE seeds on synthetic activations with known features "
       f"(d = {preset.d_in}, N = {preset.num_features}, true L0 = {preset.l0:g})")
  with open(os.path.splitext(png)[0] + "_table.md", "w") as f:
    f.write("\n".join(table_rows(results)) + "\n")
  return {"rows": [{"x": f"{r['sweep']}:{r['x']}", "mean": r["shared"]["mean"],
                    "std": r["shared"]["std"]} for r in results],
          "points": results, "preset": dataclasses.asdict(preset)}


def load(path: str) -> list[dict]:
  with open(path) as f:
    return json.load(f)["points"]
