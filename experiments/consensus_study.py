"""The consensus study (experiments/run.py --study=consensus): what the seeds agree on, as an SAE.

On the census's S seeds and their match (stability.csv):

  sweep       `jaxsae consensus` at every M = 1..S: its width, k, FVU and L0 beside the seeds'
  importance  the ablation importance (match's importance.npz, as the report shows it) of the
              latents by the size of their group: do features found in many seeds matter more
              than orphans?
  drift       a run initialised with a consensus dictionary, trained further, against a run of
              the same width and k from a random initialisation: how far each latent's decoder
              row moves (cosine between its start and its end)

The initialised run is an ordinary `jaxsae train` run whose step-0 checkpoint holds the
consensus weights (with fresh Adam moments), so the trainer resumes from it as from any
checkpoint, and its first batch does not reset b_dec.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxsae import consensus
from jaxsae import match
from jaxsae import saes
from jaxsae.errors import JaxsaeError


def sweep(match_dir: str, out: str, num_seeds: int, eval_tokens: int) -> list[dict]:
  """consensus.json of `jaxsae consensus` at M = 1..num_seeds (each kept in OUT/mM/), up to
  the last M with a feature found in M seeds."""
  rows = []
  for m in range(1, num_seeds + 1):
    path = os.path.join(out, f"m{m}", consensus.RESULT_FILE)
    if not os.path.exists(path):
      try:
        consensus.run(consensus.ConsensusConfig(inputs=(match_dir,), out=os.path.dirname(path),
                                                min_seeds=m, eval_tokens=eval_tokens))
      except JaxsaeError as e:  # no feature is found in this many seeds: the sweep ends
        print(f"M={m}: {e}")
        break
    with open(path) as f:
      rows.append(json.load(f))
  return rows


def table(rows: list[dict]) -> list[dict]:
  """One line per M: width, k, FVU and L0 of the consensus; the seeds' mean FVU and L0."""
  out = []
  for r in rows:
    seeds = r["eval"]["seeds"]
    out.append({"min_seeds": r["min_seeds"], "width": r["width"], "k": r["k"],
                "fvu": r["eval"]["consensus"]["fvu"], "l0": r["eval"]["consensus"]["l0"],
                "seed_fvu": float(np.mean([s["fvu"] for s in seeds])),
                "seed_fvu_std": float(np.std([s["fvu"] for s in seeds])),
                "seed_l0": float(np.mean([s["l0"] for s in seeds])),
                "seed_width": int(np.mean([s["width"] for s in seeds]))})
  return out


def importance_by_group(match_dir: str) -> dict:
  """Median (and quartiles of) ablation importance of every seed's latents, by how many seeds
  their group spans; and members of groups of >= M seeds against orphans (group of 1)."""
  found = match.read(match_dir)
  summary, stable = found.summary, found.stability
  with np.load(os.path.join(match_dir, match.IMPORTANCE_FILE)) as z:
    imp = np.concatenate([z[f"sae{i}"][stable[stable.sae == i].latent.values]
                          for i in range(len(summary["saes"]))])
  size = np.concatenate([stable[stable.sae == i].group_size.values
                         for i in range(len(summary["saes"]))])
  q = lambda x: {"n": int(len(x)), "median": float(np.median(x)), "q25": float(
      np.percentile(x, 25)), "q75": float(np.percentile(x, 75))} if len(x) else None
  s_total = len(summary["saes"])
  return {"tokens": int(summary.get("importance_tokens", 0)),
          "by_group_size": [{"group_size": g, **(q(imp[size == g]) or {"n": 0})}
                            for g in range(1, s_total + 1)],
          "kept_vs_orphan": [{"min_seeds": m, "kept": q(imp[size >= m]),
                              "orphan": q(imp[size == 1])} for m in range(2, s_total + 1)]}


def init_from(sae_dir: str, cfg) -> None:
  """Makes cfg.out a run whose step-0 checkpoint holds the SAE in `sae_dir` (one seed)."""
  from flax import nnx
  from jaxsae import store as store_lib
  from jaxsae import train
  from jaxsae.train import checkpoints, plan as plan_lib
  if os.path.exists(os.path.join(cfg.out, "run.json")):
    return
  sae = saes.load_sae(sae_dir)
  store = store_lib.Store(cfg.store)
  plan = train.resolve(cfg, store.d_in, store.num_tokens)
  plan_lib.check_run_dir(plan)
  tx, _ = train.make_optimizer(plan)
  ts = train.TrainState.of(plan, tx)
  module = ts.seeds.sae
  for name, value in (("W_enc", sae.W_enc.T), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec),
                      ("b_dec", sae.b_dec)):
    getattr(module, name)[...] = np.asarray(value, np.float32)[None]
  mngr = checkpoints.checkpoint_manager(plan.checkpoints)
  checkpoints.save(mngr, nnx.state(ts))
  checkpoints.close(mngr)


def initial_decoder(cfg) -> np.ndarray:
  """The decoder rows [n, d_in] a fresh run of `cfg` starts from (its first seed)."""
  from jaxsae import store as store_lib
  from jaxsae import train
  store = store_lib.Store(cfg.store)
  plan = train.resolve(cfg, store.d_in, store.num_tokens)
  ts = train.TrainState.of(plan, train.make_optimizer(plan)[0])
  return np.asarray(ts.seeds.sae.W_dec[...][0])


def drift(start: np.ndarray, end: np.ndarray, threshold: float = 0.7) -> dict:
  """How far each latent's decoder row moved: cosine between its start and its end."""
  unit = lambda w: w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  cos = np.sum(unit(start) * unit(end), 1)
  return {"mean_cos": float(cos.mean()), "median_cos": float(np.median(cos)),
          f"fraction_above_{threshold}": float((cos >= threshold).mean()),
          "hist": np.histogram(cos, bins=np.linspace(-1, 1, 41))[0].tolist()}


def plot(rows: list[dict], importance: dict, drifts: dict, png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
  m = [r["min_seeds"] for r in rows]
  ax = axes[0]
  ax.plot(m, [r["width"] for r in rows], "o-", color="tab:blue", label="consensus width")
  ax.axhline(rows[0]["seed_width"], color="tab:blue", ls=":", label="one seed's width")
  ax.set_xlabel("M: found in at least M of the seeds")
  ax.set_ylabel("latents", color="tab:blue")
  ax.set_xticks(m)
  tw = ax.twinx()
  tw.plot(m, [r["fvu"] for r in rows], "s-", color="tab:red", label="consensus FVU")
  tw.axhline(rows[0]["seed_fvu"], color="tab:red", ls=":", label="seeds' FVU")
  tw.set_ylabel("FVU", color="tab:red")
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = tw.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, fontsize=7)
  ax.set_title("consensus dictionary against M", fontsize=9)
  ax = axes[1]
  pts = [p for p in importance["by_group_size"] if p["n"]]
  g = [p["group_size"] for p in pts]
  ax.errorbar(g, [p["median"] for p in pts],
              yerr=[[p["median"] - p["q25"] for p in pts], [p["q75"] - p["median"] for p in pts]],
              fmt="o-", capsize=3)
  ax.set_yscale("symlog", linthresh=1e-5)
  ax.set_xticks(g)
  ax.set_xlabel("seeds the latent's group spans (1: orphan)")
  ax.set_ylabel("importance (FVU added by ablation)")
  ax.set_title("median and quartiles, every seed's latents", fontsize=9)
  ax = axes[2]
  edges = np.linspace(-1, 1, 41)
  for label, d in drifts.items():
    h = np.asarray(d["hist"], float)
    ax.step(edges[:-1], h / max(h.sum(), 1), where="post",
            label=f"{label}: mean cos {d['mean_cos']:.3f}"
                  + (f", FVU {d['fvu_end']:.3f} at the end" if "fvu_end" in d else ""))
  ax.set_xlabel("cosine of each latent's decoder row, start against end")
  ax.set_ylabel("fraction of latents")
  ax.set_title("trained further: consensus vs random initialisation", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)
