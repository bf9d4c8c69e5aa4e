"""The paper's studies as ready-made sweeps: train, match, and draw each figure with error bars.

  python -m experiments.run --flagfile=experiments/cpu.flags --study=size
  python -m experiments.run --flagfile=experiments/paper.flags --study=k --store=gs://b/store

Studies (Paulo & Belrose 2025, arXiv 2501.16615):
  size       sharing against the number of latents, at fixed k
  k          sharing against k, at fixed size
  arch       TopK, ReLU+L1, Gated, JumpReLU, BatchTopK (decoder-only rule, as the paper's code)
  length     sharing against training tokens, a run per length that completes its schedule
  frequency  sharing against firing frequency, from the base run
  threshold  sharing against the cosine threshold (0.5 to 0.9), from the base run
  layers     sharing of the MLP output against relative depth, one store of --layers
  sites      the residual stream against the MLP output at the same layers (same store)

And the questions it left open (analyses in experiments/open_questions.py):
  census        nine seeds in one program: in how many of them each latent is found
  trajectory    sharing and PW-MCC along one run (snapshots) and over runs of each length
  init_vs_data  pairs differing in initialisation only, data order only, or both
  arch_l0       every architecture at equal sparsity (--target_l0 for the penalty ones)
  matryoshka    Matryoshka BatchTopK against flat TopK and BatchTopK, overall and per group
  consensus     the census's seeds as one consensus SAE for M = 1..S (width, FVU, L0), the
                importance of its latents against orphans, and how far a consensus
                initialisation moves when trained further (experiments/consensus_study.py)
  ground_truth  seeds on synthetic activations with known features: sharing against recovery
                of the truth, and what orphans are (experiments/ground_truth.py)
  absorption    first-letter absorption of k and width sweeps at a residual and an MLP site,
                against sharing (experiments/absorption_study.py)
  paper_saes    the paper's own released SAEs (hf://EleutherAI/sae_overlap) matched by
                `jaxsae match`: its size, k, census and layer numbers recomputed
                (experiments/paper_saes.py)

Every point is S seeds trained at once (`jaxsae train`), all S(S-1)/2 pairs matched
(`jaxsae match`); error bars are the standard deviation over pairs. Each stage reuses what a
previous run finished, so a rerun after an interruption continues. Results go to
OUT/STUDY/results.json and OUT/STUDY/STUDY.png.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from experiments import absorption_study as ab
from experiments import consensus_study as cs
from experiments import depth_study as ds
from experiments import ground_truth as gt
from experiments import open_questions as oq
from experiments import paper_saes as ps
from jaxsae import consensus
from jaxsae import extract
from jaxsae import files
from jaxsae import formats
from jaxsae import match
from jaxsae import store as store_lib
from jaxsae import train
from jaxsae.sae import ARCHITECTURES

PAPER_STUDIES = ["size", "k", "arch", "length", "frequency", "threshold"]
OPEN_STUDIES = ["layers", "sites", "census", "trajectory", "init_vs_data", "arch_l0",
                "matryoshka", "consensus",
                "ground_truth", "absorption", "paper_saes"]
# Studies that write (or pick) their own stores, or need none.
OWN_STORES = ["layers", "sites", "ground_truth", "absorption", "paper_saes"]
_STUDY = flags.DEFINE_enum("study", "size", PAPER_STUDIES + OPEN_STUDIES, "Which study to run.")
_OUT = flags.DEFINE_string("out", "out/experiments", "Where runs, matches and figures go.")
_STORE = flags.DEFINE_string("store", "", "Activation store; extracted here (with the flags "
                             "below) when empty or missing.")
_MODEL = flags.DEFINE_string("model", extract.DEFAULT_MODEL, "Model to extract from.")
_SITE = flags.DEFINE_string("site", "model.layers.15.mlp", "Site to extract.")
_DATASET = flags.DEFINE_string("dataset", "default", "Dataset to extract from.")
_EXTRACT_TOKENS = flags.DEFINE_integer("extract_tokens", 524_288, "Tokens to extract.")
_CTX = flags.DEFINE_integer("ctx_len", 256, "Extraction window.")
_SIZES = flags.DEFINE_list("sizes", ["512", "1024", "2048", "4096", "8192"],
                           "num_latents values of the size study.")
_KS = flags.DEFINE_list("ks", ["16", "32", "64", "128"], "k values of the k study.")
_ARCHS = flags.DEFINE_list("archs", ["topk", "relu_l1", "gated", "jumprelu", "batchtopk"],
                           "Architectures of the arch study.")
_LENGTHS = flags.DEFINE_list("lengths", [], "Token counts of the length study; default "
                             "1/8, 1/4, 1/2 and all of --num_tokens.")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", 2048, "Base size.")
_K = flags.DEFINE_integer("k", 32, "Base k.")
_SEEDS = flags.DEFINE_integer("num_seeds", 3, "Seeds per point (pairs = S(S-1)/2).")
_TOKENS = flags.DEFINE_integer("num_tokens", 1_048_576, "Training tokens per seed.")
_BATCH = flags.DEFINE_integer("batch_size", 1024, "Tokens per batch.")
_WARMUP = flags.DEFINE_integer("lr_warmup_steps", 100, "Learning-rate warmup steps.")
_LR = flags.DEFINE_float("lr", None, "Adam learning rate; default the paper's "
                         "2e-4 / sqrt(num_latents / 2^14).")
_MESH = flags.DEFINE_string("mesh", "auto", "Device mesh for training.")
_CENSUS_SEEDS = flags.DEFINE_integer("census_seeds", 9, "Seeds of the census run (the paper's "
                                     "nine); its snapshots are the trajectory study's.")
_SNAPSHOTS = flags.DEFINE_list("snapshots", [], "Token counts of the census run's snapshots and "
                               "of the trajectory's full-schedule runs; default num_tokens / 32, "
                               "/ 16, / 8, / 4, / 2.")
_GRID = flags.DEFINE_integer("grid", 3, "init_vs_data trains G initialisations x G data orders.")
_L0S = flags.DEFINE_list("l0s", ["16", "32"], "Target L0s of the arch_l0 study.")
_L0_ARCHS = flags.DEFINE_list("l0_archs", ["topk", "batchtopk", "relu_l1", "gated", "jumprelu"],
                              "Architectures of the arch_l0 study (k = L0 for topk and "
                              "batchtopk; --target_l0 for the others).")
_CONSENSUS_SNAPSHOT = flags.DEFINE_integer("consensus_snapshot", 0, "consensus study: the "
                                          "census snapshot (its tokens, one of --snapshots) "
                                          "to take the seeds from; 0: the finished census")
_CONSENSUS_EVAL = flags.DEFINE_integer("consensus_eval_tokens", 65_536, "consensus study: "
                                       "tokens each dictionary's FVU and L0 are measured on")
_CONSENSUS_M = flags.DEFINE_integer("consensus_m", 0, "consensus study: the M whose dictionary "
                                    "is trained further; 0: a majority of the seeds")
_CONSENSUS_TRAIN = flags.DEFINE_integer("consensus_train_tokens", None, "consensus study: "
                                        "tokens the consensus and a random initialisation are "
                                        "trained further on; default --num_tokens / 4")
_GT_PRESET = flags.DEFINE_enum("gt_preset", "reduced", list(gt.PRESETS), "Scale of the "
                               "ground_truth study: reduced (this CPU, ~15 min) or full "
                               "(SynthSAEBench's 16,384 features in d = 768; an accelerator).")
_ABS_TOKENS = flags.DEFINE_integer("absorption_tokens", 65_536, "Tokens of the absorption "
                                   "study's two-site store (residual and MLP output of the "
                                   "middle layer of --model: smollm2 or gemma-3-270m).")
_ABS_TRAIN = flags.DEFINE_integer("absorption_train_tokens", 262_144, "Training tokens per seed "
                                  "of the absorption study's SAEs.")
_ABS_SEEDS = flags.DEFINE_integer("absorption_seeds", 2, "Seeds per absorption point.")
_ABS_WORDS = flags.DEFINE_integer("absorption_words", 1200, "Alphabetic tokens prompted (0: "
                                  "every one, as SAEBench; ~47K for SmolLM2).")
_ABS_REUSE = flags.DEFINE_list("absorption_reuse", [], "RUN=MATCH_DIR of existing runs to "
                               "evaluate too, each at the study site its run.json names (e.g. "
                               "the demo's out/demo/run=out/demo/match, the MLP site).")
_LAYERS = flags.DEFINE_list("layers", ["0", "4", "8", "12", "15", "20", "25", "-1"],
                            "Layers of the layers and sites studies (negative: from the last; "
                            "relative depth is over the deepest one, so end at -1).")
_DEPTH_TOKENS = flags.DEFINE_integer("depth_extract_tokens", None, "Tokens of the layers and "
                                     "sites studies' store (2 sites per layer); default "
                                     "--extract_tokens.")
_BESIDE = flags.DEFINE_multi_string("beside", [], "LABEL=PATH: draw the rows of another "
                                    "results.json of the same study beside this one's (e.g. the "
                                    "same lengths on another store); repeatable.")
_LABEL = flags.DEFINE_string("label", "", "What tells this run's curve apart from --beside's "
                             "(e.g. '4M-token store'), added to its legend entry.")
_PAPER_REPO = flags.DEFINE_string("paper_repo", ps.REPO, "paper_saes study: the Hub repository "
                                  "of the paper's SAEs, one folder per run")
_PAPER_REV = flags.DEFINE_string("paper_revision", None, "paper_saes study: its branch, tag or "
                                 "commit; default the default branch")
_PAPER_SEED1 = flags.DEFINE_string("paper_seed1", ps.SEED1_32K, "paper_saes study: seed 1 of "
                                   "the 32K-latent k = 32 run, released on its own, as "
                                   "hf://OWNER/REPO[/FOLDER][@REVISION]")
_PAPER_HOOK = flags.DEFINE_string("paper_hookpoint", ps.HOOKPOINT, "paper_saes study: the "
                                  "hookpoint folder of the size, k and census parts")
_PAPER_STRICT = flags.DEFINE_bool("paper_strict", True, "paper_saes study: cosines > 0.7, as "
                                  "the paper's notebook (false: jaxsae's >= 0.7)")
_PAPER_PARTS = flags.DEFINE_list("paper_parts", list(ps.PARTS), "paper_saes study: which of "
                                 f"{', '.join(ps.PARTS)} to recompute")
_ARCH_TOKENS = flags.DEFINE_integer("arch_tokens", None, "Training tokens per seed of the "
                                    "arch_l0 and matryoshka studies; default --num_tokens.")

# The paper's numbers (Pythia-160M layer-6 MLP, k = 32, 8B Pile tokens, both-above rule at 0.7
# unless noted), as read from its analysis code's outputs: what jaxsae's curves sit beside.
# Beside the shared fraction, where the paper's figures draw them (read off them, about +-0.002):
# `bijections_agree`, the fraction of latents whose encoder and decoder bijections agree, with no
# threshold, and the decoder and encoder PW-MCC (mean matched cosine); None where not drawn.
PAPER = {
    "size": {"rule": "both_above", "x": [768, 4096, 32768, 131072],
             "y": [0.785, 0.696, 0.416, 0.276],
             "bijections_agree": [0.949, 0.916, 0.793, 0.702],
             "decoder_mcc": [0.836, 0.805, 0.677, 0.603],
             "encoder_mcc": [0.804, 0.744, 0.594, 0.522]},
    "k": {"rule": "both_above", "x": [32, 64, 128, 256], "y": [0.416, 0.305, 0.234, 0.177],
          "bijections_agree": [0.793, 0.706, 0.617, 0.624],
          "decoder_mcc": [0.677, 0.569, 0.482, 0.456]},
    "arch": {"rule": "decoder", "x": ["gated", "relu_l1", "topk"], "y": [0.856, 0.824, 0.742]},
    "length": {"rule": "both_above", "x": [0.8e9, 8e9, 80e9], "y": [0.073, 0.416, 0.612],
               "bijections_agree": [0.459, 0.793, 0.875],
               "decoder_mcc": [0.391, 0.677, 0.785]},
}
# Pythia-160M MLP output, layers 0-11, shared fraction (both_above, 0.7) per dictionary size.
PAPER_LAYERS = {
    768: [0.030, 0.562, 0.656, 0.708, 0.819, 0.776, 0.785, 0.819, 0.831, 0.876, 0.846, 0.760],
    4096: [0.001, 0.506, 0.445, 0.596, 0.719, 0.705, 0.696, 0.670, 0.726, 0.756, 0.693, 0.534],
    32768: [0.000, 0.141, 0.155, 0.239, 0.445, 0.416, 0.416, 0.385, 0.422, 0.461, 0.408, 0.249],
}
# Residual stream against MLP output, 36x expansion, k = 32, decoder-only rule.
PAPER_SITES = {"SmolLM-135M": {"resid": 0.557, "mlp": 0.716},
               "GPT-2": {"resid": 0.622, "mlp": 0.742},
               "Pythia-160M": {"resid": 0.632, "mlp": 0.548}}


def store_dir() -> str:
  path = _STORE.value or os.path.join(_OUT.value, "store")
  if files.is_remote(path) or os.path.exists(os.path.join(path, "manifest.json")):
    return path
  extract.run(extract.ExtractConfig(model=_MODEL.value, dataset=_DATASET.value,
                                    sites=(_SITE.value,), num_tokens=_EXTRACT_TOKENS.value,
                                    ctx_len=_CTX.value, out=path))
  return path


def train_and_match(name: str, store: str, keep_at_tokens=(), **overrides) -> str:
  """Trains one point's seeds (or resumes) and matches all pairs; returns the run directory."""
  # The frequency and threshold studies read the same base run: train it once.
  study = _STUDY.value if name != "base" or keep_at_tokens else "shared"
  return trained(study, name, store, keep_at_tokens=tuple(keep_at_tokens), **overrides)


def trained_config(group: str, name: str, store: str) -> dict:
  """The base settings of a run in OUT/group/name."""
  return dict(store=store, out=os.path.join(_OUT.value, group, name), arch="topk",
              num_latents=_NUM_LATENTS.value, k=_K.value, num_seeds=_SEEDS.value,
              num_tokens=_TOKENS.value, batch_size=_BATCH.value, lr=_LR.value,
              lr_warmup_steps=_WARMUP.value, mesh=_MESH.value, checkpoint_every=500)


def trained(group: str, name: str, store: str, **overrides) -> str:
  """OUT/group/name trained (or resumed) with the base settings and `overrides`."""
  cfg = {**trained_config(group, name, store), **overrides}
  run_dir = cfg["out"]
  seeds = cfg.get("seeds") or range(cfg["num_seeds"])
  data = cfg.get("data_seeds")
  members = train.member_names(list(seeds), list(data or ()))
  if not all(formats.is_sae_dir(os.path.join(run_dir, m)) for m in members):
    if data:
      cfg.pop("num_seeds")
    train.run(train.TrainConfig(**cfg))
  return run_dir


def matched(run_dir: str, out: str, **kwargs) -> dict:
  path = os.path.join(out, match.SUMMARY_FILE)
  if not os.path.exists(path):
    match.run(match.MatchConfig(inputs=(run_dir,), out=out, **kwargs))
  with open(path) as f:
    return json.load(f)


def point(summary: dict, rule: str) -> dict:
  r = summary["rules"][rule]
  return {"mean": r["mean"], "std": r["std"], "pairs": len(summary["pairs"]),
          **oq.series(summary)}


def sweep(store: str) -> list[dict]:
  study = _STUDY.value
  rule = PAPER.get(study, {}).get("rule", "both_above")
  rows = []
  if study in ("size", "k", "arch"):
    values = {"size": _SIZES.value, "k": _KS.value, "arch": _ARCHS.value}[study]
    key = {"size": "num_latents", "k": "k", "arch": "arch"}[study]
    for v in values:
      v = v if study == "arch" else int(v)
      run_dir = train_and_match(f"{key}{v}", store, **{key: v})
      rows.append({"x": v, **point(matched(run_dir, run_dir + "-match"), rule)})
  elif study == "length":
    # Each length is a run that completes its own schedule (warmup, then decay to 0), not a
    # snapshot taken while the learning rate was still high; the trajectory study draws both.
    lengths = [int(t) for t in _LENGTHS.value] or [
        (_TOKENS.value // f) // _BATCH.value * _BATCH.value for f in (8, 4, 2)]
    for t in lengths:
      run_dir = trained("length", f"tokens{t}", store, num_tokens=t)
      rows.append({"x": t, **point(matched(run_dir, run_dir + "-match"), rule)})
    run_dir = train_and_match("base", store)
    rows.append({"x": _TOKENS.value, **point(matched(run_dir, run_dir + "-match"), rule)})
  else:
    run_dir = train_and_match("base", store)
    rows = per_latent_curve(run_dir + "-match", matched(run_dir, run_dir + "-match"), study)
  return rows


def per_latent_curve(match_dir: str, summary: dict, study: str) -> list[dict]:
  """Sharing per frequency bin or per threshold, mean and std over pairs, from latents.csv.

  A frequency bin also carries the threshold-free views restricted to its latents (the
  fraction whose bijections agree, the mean matched decoder and encoder cosine), since
  whether frequent latents are settled need not hang on the 0.7 cut. Those views do not
  depend on the threshold, so each threshold point carries the whole run's."""
  from jaxsae import report
  table = match.read(match_dir).latents
  pairs = list(table.groupby(["a", "b"], sort=False))
  edges = np.logspace(-6, 0, 13)  # per-latent frequency bins, fixed across runs to compare
  if study == "threshold":
    # report's sweep, per pair; its `agree` rule is both cosines above and one partner.
    xs = report.THRESHOLDS
    fractions = report.threshold_fractions(table, xs)
    curves = {"shared": fractions["both_above"], "agree_rule": fractions["agree"]}
  else:
    xs = np.sqrt(edges[:-1] * edges[1:])
    curves = {name: [] for name in ("shared", *oq.SERIES)}
    for _, g in pairs:
      enc, dec, agree = g.enc_cos.to_numpy(), g.dec_cos.to_numpy(), g.agree.to_numpy(bool)
      freq = g.frequency.to_numpy() if "frequency" in g else np.full(len(g), np.nan)
      shared = (enc >= summary["threshold"]) & (dec >= summary["threshold"])
      bins = [(freq >= lo) & (freq < hi) for lo, hi in zip(edges[:-1], edges[1:])]
      for name, v in zip(("shared", *oq.SERIES), (shared, agree, dec, enc)):
        curves[name].append([float(v[b].mean()) if b.sum() >= 5 else float("nan")
                             for b in bins])

  def stats(c: np.ndarray, i: int) -> dict:
    ok = np.isfinite(c[:, i]).any()
    return {"mean": float(np.nanmean(c[:, i])) if ok else None,
            "std": float(np.nanstd(c[:, i])) if ok else None}

  c = {name: np.array(v) for name, v in curves.items()}
  whole = oq.series(summary)
  # A threshold point also carries the agree rule (same partner in both bijections as well),
  # whose limit as the threshold falls is the bijections' agreement.
  return [{"x": float(x), **stats(c["shared"], i), "pairs": len(pairs),
           **({name: stats(c[name], i) for name in oq.SERIES} if study == "frequency"
              else {**whole, "agree_rule": stats(c["agree_rule"], i)})}
          for i, x in enumerate(xs)]


def beside(study: str) -> list[tuple[str, list[dict]]]:
  """(label, rows) of each --beside results.json, refused unless it holds `study`."""
  out = []
  for spec in _BESIDE.value:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
      raise app.UsageError(f"--beside={spec!r}: expected LABEL=PATH/results.json")
    try:
      with open(path) as f:
        res = json.load(f)
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--beside={spec!r}: cannot read {path}: {e}")
    if res.get("study") != study:
      raise app.UsageError(f"--beside={spec!r}: {path} holds the {res.get('study')!r} study, "
                           f"not {study!r}")
    out.append((label, [r for r in res["rows"] if r["mean"] is not None]))
  return out


def plot(rows: list[dict], path: str, others: list[tuple[str, list[dict]]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  study = _STUDY.value
  rows = [r for r in rows if r["mean"] is not None]
  # The threshold-free views beside the shared fraction, per point; the threshold curve's are
  # the same at every threshold, so its one panel draws the agree rule's limit instead.
  panels = 3 if rows and "decoder_mcc" in rows[0] and study != "threshold" else 1
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), dpi=120, squeeze=False)
  categorical = study == "arch"
  xs = list(range(len(rows))) if categorical else [r["x"] for r in rows]
  ref = PAPER.get(study) or {}
  label = {"size": "latents", "k": "k", "arch": "architecture", "length": "training tokens",
           "frequency": "firing frequency", "threshold": "cosine threshold"}[study]
  rule = ref.get("rule", "both_above")
  tag = f"{_LABEL.value}, " if _LABEL.value else ""
  ours = f"jaxsae ({_MODEL.value}, {tag}{_SEEDS.value} seeds)"
  draws = [[("mean", "std", ours, "y", None)]]
  if panels == 3:
    draws += [[("bijections_agree", None, ours, "bijections_agree", None)],
              [(f"{side}_mcc", None, tag + side, f"{side}_mcc", f"C{i}")
               for i, side in enumerate(("decoder", "encoder"))]]
  ylabels = [f"fraction shared ({rule})", "fraction whose bijections agree (no threshold)",
             "mean matched cosine (PW-MCC)"]
  for ax, draw, ylabel in zip(axes[0], draws, ylabels):
    for key, std, name, paper_key, color in draw:
      if std:
        y, err = [r[key] for r in rows], [r[std] for r in rows]
      else:
        got = [r.get(key) or {"mean": np.nan, "std": np.nan} for r in rows]
        y, err = [g["mean"] for g in got], [g["std"] for g in got]
      ax.errorbar(xs, y, yerr=err, marker="o", capsize=4, color=color,
                  linestyle="none" if categorical else "-", label=name)
      for i, (other, other_rows) in enumerate(others):
        got = [r[key] if std else (r.get(key) or {"mean": np.nan}).get("mean")
               for r in other_rows]
        ox = list(range(len(other_rows))) if categorical else [r["x"] for r in other_rows]
        ax.plot(ox, got, "^" if categorical else "^:", color=color or f"C{i + 2}", alpha=0.7,
                label=f"{other}, {key.split('_')[0]}" if color else other)
      paper_y = ref.get(paper_key)
      if not paper_y:
        continue
      what = "paper (Pythia-160M)" + (f", {key.split('_')[0]}" if color else "")
      if categorical:
        on = [(i, paper_y[ref["x"].index(r["x"])]) for i, r in enumerate(rows)
              if r["x"] in ref["x"]]
        if on:
          ax.plot(*zip(*on), "s", color="gray", label=what)
      else:
        ax.plot(ref["x"], paper_y, "s--", color=color or "gray", alpha=0.6, label=what)
    if categorical:
      ax.set_xticks(xs, [r["x"] for r in rows])
    elif study in ("size", "k", "length", "frequency"):
      ax.set_xscale("log", base=2 if study in ("size", "k") else 10)
    ax.set_xlabel(label)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if study == "threshold" and rows and rows[0].get("bijections_agree"):
    # The agree rule, and where it heads as the threshold falls: with no cosine cut it is the
    # fraction whose bijections agree (both_above heads to 1).
    ax = axes[0, 0]
    ax.errorbar(xs, [r["agree_rule"]["mean"] for r in rows],
                yerr=[r["agree_rule"]["std"] for r in rows], marker="o", capsize=4,
                color="C1", label=f"{ours}, agree rule")
    ax.axhline(rows[0]["bijections_agree"]["mean"], color="C1", linestyle="--",
               label="bijections agree (no threshold): the agree rule's limit")
    ax.legend(fontsize=8, loc="lower left")
  axes[0, 0].set_title(f"Sharing across seeds against {label}")
  fig.tight_layout()
  fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# The questions the paper left open: each returns its results and draws its figure.


def snapshot_tokens() -> list[int]:
  return [int(t) for t in _SNAPSHOTS.value] or [
      (_TOKENS.value // f) // _BATCH.value * _BATCH.value for f in (32, 16, 8, 4, 2)]


def census_run(store: str) -> str:
  """The census's S seeds in one program, with the trajectory's snapshots on the way."""
  return trained("nine", "base", store, num_seeds=_CENSUS_SEEDS.value,
                 keep_at_tokens=tuple(snapshot_tokens()))


def study_census(store: str, png: str) -> dict:
  run_dir = census_run(store)
  summary = matched(run_dir, run_dir + "-match")
  table = match.read(run_dir + "-match").latents
  res = {rule: oq.census(summary, table, rule) for rule in ("both_above", "agree")}
  oq.plot_census(res["both_above"], {**summary["seeds"], "rule": summary["definition"]}, png,
                 f"jaxsae ({_CENSUS_SEEDS.value} seeds)")
  rows = [{"x": r["count"], "mean": r["mean"], "std": r["std"]}
          for r in res["both_above"]["found_in"]]
  # The only-in-the-base curve is match.json's own (seed 0 as the base, random subsets of the
  # others), so it is what `jaxsae match` reports for the same run.
  return {"rows": rows, "census": res, "paper": oq.PAPER_CENSUS, **oq.series(summary),
          "only_base": summary["seeds"]["fraction_only_base"],
          "seeds_from_seed0": summary["seeds"]}


def _trajectory_point(summary: dict, tokens: int) -> dict:
  return {"tokens": tokens, "shared": oq.rule_point(summary, "both_above"), **oq.series(summary)}


def study_trajectory(store: str, png: str) -> dict:
  run_dir = census_run(store)
  snaps = []
  for t in snapshot_tokens():
    # Frequencies are not needed here, and would cost a pass over the store per snapshot.
    s = matched(os.path.join(run_dir, f"tokens{t}"), f"{run_dir}-match-tokens{t}",
                freq_tokens=0)
    snaps.append(_trajectory_point(s, t))
  final = _trajectory_point(matched(run_dir, run_dir + "-match"), _TOKENS.value)
  full = []
  for t in snapshot_tokens():
    sub = trained("length", f"tokens{t}", store, num_tokens=t)
    full.append(_trajectory_point(matched(sub, sub + "-match"), t))
  oq.plot_trajectory(snaps + [final], full + [final], png)
  rows = [{"x": r["tokens"], "mean": r["shared"]["mean"], "std": r["shared"]["std"],
           "kind": "snapshot"} for r in snaps + [final]]
  rows += [{"x": r["tokens"], "mean": r["shared"]["mean"], "std": r["shared"]["std"],
            "kind": "full_schedule"} for r in full]
  return {"rows": rows, "snapshots": snaps + [final], "full_schedule": full + [final],
          "snapshot_seeds": _CENSUS_SEEDS.value}


def study_init_vs_data(store: str, png: str) -> dict:
  g = _GRID.value
  # Member (I, D): initialisation seed I, data-order seed D, all in one program.
  seeds = tuple(i for d in range(g) for i in range(g))
  data = tuple(d for d in range(g) for _ in range(g))
  run_dir = trained("init_vs_data", f"grid{g}", store, seeds=seeds, data_seeds=data)
  summary = matched(run_dir, run_dir + "-match")
  kinds = oq.pair_kinds(summary)
  oq.plot_kinds(kinds, png)
  rows = [{"x": k, "mean": v["both_above"]["mean"], "std": v["both_above"]["std"],
           "pairs": v["pairs"], **{s: v[s] for s in oq.SERIES}} for k, v in kinds.items()]
  return {"rows": rows, "kinds": kinds, "grid": g}


def _at_l0(arch: str, l0: int) -> dict:
  tokens = _ARCH_TOKENS.value or _TOKENS.value
  if ARCHITECTURES[arch].selects_top_k:
    return dict(arch=arch, k=l0, num_tokens=tokens)
  return dict(arch=arch, target_l0=l0, num_tokens=tokens)


def _arch_row(store: str, arch: str, l0: int) -> dict:
  run_dir = trained("l0", f"{arch}_l0{l0}", store, **_at_l0(arch, l0))
  summary = matched(run_dir, run_dir + "-match")
  freqs = match.read(run_dir + "-match").frequencies
  return {"arch": arch, "l0_target": l0, "l0": oq.l0s(freqs),
          "both_above": oq.rule_point(summary, "both_above"),
          "decoder": oq.rule_point(summary, "decoder"), **oq.series(summary),
          "match": run_dir + "-match"}


def study_arch_l0(store: str, png: str) -> dict:
  rows = [_arch_row(store, a, int(l0)) for l0 in _L0S.value for a in _L0_ARCHS.value]
  oq.plot_arch_l0(rows, png)
  return {"rows": [{"x": f"{r['arch']}@{r['l0_target']}", "mean": r["both_above"]["mean"],
                    "std": r["both_above"]["std"], **{s: r[s] for s in oq.SERIES}}
                   for r in rows], "points": rows}


def study_matryoshka(store: str, png: str) -> dict:
  overall = [_arch_row(store, a, _K.value) for a in ("topk", "batchtopk", "matryoshka")]
  m_dir = overall[-1]["match"]
  found = match.read(m_dir)
  summary, table = found.summary, found.latents
  with open(os.path.join(summary["saes"][0]["path"], "cfg.json")) as f:
    bounds = oq.group_bounds(json.load(f)["jaxsae"]["matryoshka_widths"])
  groups = {"matryoshka": oq.nested(table, summary, bounds)}
  for row in overall[:-1]:
    m = match.read(row["match"])
    groups[f"{row['arch']} (by frequency)"] = oq.nested(m.latents, m.summary, bounds,
                                                        by_frequency=True, freqs=m.frequencies)
  oq.plot_nested(overall, groups, png)
  return {"rows": [{"x": r["arch"], "mean": r["both_above"]["mean"],
                    "std": r["both_above"]["std"], **{s: r[s] for s in oq.SERIES}}
                   for r in overall],
          "overall": overall, "groups": groups, "bounds": bounds}


def study_consensus(store: str, png: str) -> dict:
  seeds = census_run(store) if not _CONSENSUS_SNAPSHOT.value else os.path.join(
      _OUT.value, "nine", "base", f"tokens{_CONSENSUS_SNAPSHOT.value}")
  group = os.path.join("consensus", f"tokens{_CONSENSUS_SNAPSHOT.value}"
                       if _CONSENSUS_SNAPSHOT.value else "final")
  out = os.path.join(_OUT.value, group)
  m_dir = os.path.join(out, "match")
  # The match measures (k's frequencies, importance) all but the store's last
  # --consensus_eval_tokens tokens, which the FVU and L0 are then measured on.
  sample = store_lib.Store(store).num_tokens - _CONSENSUS_EVAL.value
  summary = matched(seeds, m_dir, freq_tokens=sample, scan_tokens=0)  # no contexts needed
  s_total = len(summary["saes"])
  rows = cs.table(cs.sweep(m_dir, out, s_total, _CONSENSUS_EVAL.value))
  importance = cs.importance_by_group(m_dir)
  m = _CONSENSUS_M.value or s_total // 2 + 1
  cons = os.path.join(out, f"m{m}")
  row = rows[m - 1]
  further = dict(num_latents=row["width"], k=row["k"], seeds=(0,), num_seeds=None,
                 num_tokens=_CONSENSUS_TRAIN.value or _TOKENS.value // 4)
  name = f"m{m}_{further['num_tokens']}"
  init = train.TrainConfig(**{**trained_config(group, f"from_{name}", store), **further})
  cs.init_from(cons, init)
  rand = train.TrainConfig(**{**trained_config(group, f"random_{name}", store), **further})
  start = cs.initial_decoder(rand)
  drifts = {}
  for label, cfg, begin in (("consensus init", init, formats.load_sae(cons).W_dec),
                            ("random init", rand, start)):
    if not formats.is_sae_dir(os.path.join(cfg.out, "seed0")):
      train.run(cfg)
    drifts[label] = cs.drift(begin, formats.load_sae(os.path.join(cfg.out, "seed0")).W_dec)
  # Where each ends, on the tokens the consensus dictionaries were measured on.
  ends = [formats.load_sae(os.path.join(c.out, "seed0")) for c in (init, rand)]
  for label, found in zip(drifts, consensus.evaluate(ends, store_lib.Store(store), sample,
                                                     _CONSENSUS_EVAL.value, 1024, None)):
    drifts[label].update(fvu_end=found["fvu"], l0_end=found["l0"])
  drifts["consensus init"]["fvu_start"] = row["fvu"]
  cs.plot(rows, importance, drifts, png)
  return {"rows": [{"x": r["min_seeds"], "mean": r["fvu"], "std": 0.0, "width": r["width"],
                    "k": r["k"], "l0": r["l0"]} for r in rows],
          "consensus": rows, "importance": importance, "drift": drifts, "trained_m": m,
          "trained_tokens": further["num_tokens"], "seeds": seeds,
          "stability": summary["stability"], **oq.series(summary)}


def depth_store() -> tuple[str, dict[str, list[str]]]:
  """OUT/layers/store: the MLP output and residual stream of every --layers layer, written
  once by one extraction (the forward stops after the deepest), shared by both studies."""
  path = os.path.join(_OUT.value, "layers", "store")
  if not os.path.exists(os.path.join(path, "manifest.json")):  # written once it is complete
    extract.run(extract.ExtractConfig(model=_MODEL.value, dataset=_DATASET.value,
                                      sites=tuple(ds.site_requests(_LAYERS.value)),
                                      num_tokens=_DEPTH_TOKENS.value or _EXTRACT_TOKENS.value,
                                      ctx_len=_CTX.value, out=path))
  return path, ds.sites_by_kind(store_lib.Store(path).sites, len(_LAYERS.value))


def depth_rows(kinds) -> tuple[str, list[dict]]:
  store, sites = depth_store()
  last = max(ds.layer_of(s) for kind in sites.values() for s in kind)
  rows = []
  for kind in kinds:
    for site in sites[kind]:
      run_dir = trained("layers", f"{kind}{ds.layer_of(site)}", store, site=site)
      summary = matched(run_dir, run_dir + "-match")
      rows.append(ds.row(kind, site, last, oq.rule_point(summary, "both_above"),
                         oq.rule_point(summary, "decoder"), oq.series(summary)))
  return store, rows


def _depth_label() -> str:
  return f"jaxsae ({_MODEL.value}, {_SEEDS.value} seeds, {_NUM_LATENTS.value} x k={_K.value})"


def study_layers(_, png: str) -> dict:
  store, rows = depth_rows(("mlp",))
  ds.plot_layers(rows, PAPER_LAYERS, _depth_label(), png)
  return {"rows": [{**r, "x": r["layer"]} for r in rows], "rule": ds.RULE_LAYERS,
          "paper": {"model": "Pythia-160M", "site": "MLP output", "rule": ds.RULE_LAYERS,
                    "by_size": {str(k): v for k, v in PAPER_LAYERS.items()}},
          "depth_store": store}


def study_sites(_, png: str) -> dict:
  store, rows = depth_rows(ds.KINDS)
  st = store_lib.Store(store)
  sample = np.arange(0, st.num_tokens, max(st.num_tokens // 32_768, 1))
  for r in rows:  # what each site's activations look like, beside how it shares
    r["outliers"] = ds.outliers(st.rows(sample, site=r["site"]))
  ds.plot_sites(rows, PAPER_SITES, _depth_label(), png)
  # The headline is the paper's rule for this comparison: decoder-only.
  return {"rows": [{**r, "x": f"{r['kind']}@{r['layer']}", "mean": r["decoder"]["mean"],
                    "std": r["decoder"]["std"]} for r in rows], "rule": ds.RULE_SITES,
          "paper": {"rule": ds.RULE_SITES, "expansion": 36, "k": 32, "by_model": PAPER_SITES},
          "depth_store": store}


def study_ground_truth(_, png: str) -> dict:
  return gt.study(_OUT.value, gt.PRESETS[_GT_PRESET.value], trained, matched, png)


def study_absorption(_, png: str) -> dict:
  root = os.path.join(_OUT.value, "absorption")
  store = os.path.join(root, "store")
  if not os.path.exists(os.path.join(store, "manifest.json")):
    extract.run(extract.ExtractConfig(model=_MODEL.value, dataset=_DATASET.value,
                                      sites=tuple(ab.sites_of(_MODEL.value).values()),
                                      num_tokens=_ABS_TOKENS.value, ctx_len=_CTX.value,
                                      out=store))

  def train_point(group, name, store, **kw):
    return trained(group, name, store, num_seeds=_ABS_SEEDS.value,
                   num_tokens=_ABS_TRAIN.value, **kw)
  reuse = [tuple(r.split("=", 1)) for r in _ABS_REUSE.value]
  return ab.study(root, _MODEL.value, _ABS_WORDS.value, train_point, matched, store, png, reuse)


def study_paper_saes(_, png: str) -> dict:
  src = ps.Source(repo=_PAPER_REPO.value, revision=_PAPER_REV.value or None,
                  seed1_32k=_PAPER_SEED1.value, hookpoint=_PAPER_HOOK.value,
                  strict=_PAPER_STRICT.value)
  return ps.study(os.path.join(_OUT.value, "paper_saes"), src,
                  ps.paper_values(PAPER, PAPER_LAYERS), png, tuple(_PAPER_PARTS.value))


OPEN = {"layers": study_layers, "sites": study_sites, "census": study_census,
        "trajectory": study_trajectory,
        "init_vs_data": study_init_vs_data, "arch_l0": study_arch_l0,
        "matryoshka": study_matryoshka, "consensus": study_consensus,
        "ground_truth": study_ground_truth, "absorption": study_absorption,
        "paper_saes": study_paper_saes}


def main(_):
  if not flags.FLAGS["verbosity"].present:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  store = None if _STUDY.value in OWN_STORES else store_dir()
  if _STUDY.value in OPEN:
    return main_open(store)
  others = beside(_STUDY.value)  # read first: a bad --beside fails before the runs
  rows = sweep(store)
  out = os.path.join(_OUT.value, _STUDY.value)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    settings = {h.name: h.value for h in (_MODEL, _SITE, _DATASET, _EXTRACT_TOKENS, _CTX,
                                          _NUM_LATENTS, _K, _SEEDS, _TOKENS, _BATCH, _WARMUP,
                                          _LR)}
    json.dump({"study": _STUDY.value, "rows": rows, "paper": PAPER.get(_STUDY.value),
               "store": store, "settings": settings, "label": _LABEL.value,
               "beside": _BESIDE.value}, f, indent=1)
  plot(rows, os.path.join(out, f"{_STUDY.value}.png"), others)
  for r in rows:
    print(f"{r['x']!s:>12}  {r['mean'] if r['mean'] is None else round(r['mean'], 3)!s:>6} "
          f"+- {r['std'] if r['std'] is None else round(r['std'], 3)}")
  print(f"wrote {out}/results.json and {out}/{_STUDY.value}.png")


def main_open(store: str) -> None:
  study = _STUDY.value
  out = os.path.join(_OUT.value, study)
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  png = os.path.join(out, f"{study}.png")
  res = OPEN[study](store, png)
  res.update(study=study, store=store, seconds=round(time.time() - t0, 1),
             settings={h.name: h.value for h in (_MODEL, _SITE, _NUM_LATENTS, _K, _SEEDS,
                                                 _TOKENS, _BATCH, _WARMUP, _LR, _ARCH_TOKENS,
                                                 _LAYERS, _DEPTH_TOKENS, _EXTRACT_TOKENS)})
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  for r in res["rows"]:
    print(f"{r['x']!s:>16}  {round(r['mean'], 3)!s:>6} +- {round(r['std'], 3)}")
  print(f"wrote {out}/results.json and {png}")


if __name__ == "__main__":
  app.run(main)
