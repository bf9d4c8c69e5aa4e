"""The absorption study: does first-letter feature absorption go with seed dependence?

experiments/run.py --study=absorption extracts one small store holding two sites of --model
(SmolLM2's layer-15 residual stream, the metric's own setting, and its layer-15 MLP output, the
demo's; the same two at Gemma 3 270M's layer 9 of 18: `SITES_BY_MODEL`), trains k and width sweeps of S seeds at each, matches their pairs, and here:

  - measures every SAE's absorption with jaxsae.absorption (one letter probe per site, shared
    by the SAEs there), its probes' F1 beside it
  - asks whether absorbing latents are orphans more often than other latents of the same
    firing frequency (`orphan_rates`), and whether absorption rises with k and width as
    sharing falls (the table and the figure)
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from jaxsae import absorption
from jaxsae import files
from jaxsae import formats
from jaxsae import match
from jaxsae import saes as saes_lib

from experiments import open_questions as oq

# Per offline model, the middle layer's residual stream (the decoder layer's output, the metric's
# own kind of site) and its MLP output: layer 15 of SmolLM2's 30, layer 9 of Gemma 3 270M's 18.
SITES_BY_MODEL = {
    "smollm2": {"resid": "model.layers.15", "mlp": "model.layers.15.mlp"},
    "gemma-3-270m": {"resid": "model.layers.9", "mlp": "model.layers.9.mlp"},
}
SITES = SITES_BY_MODEL["smollm2"]
MODEL_NAMES = {"smollm2": "SmolLM2-135M", "gemma-3-270m": "Gemma 3 270M"}


def sites_of(model_spec: str) -> dict[str, str]:
  """The study's two sites, {"resid": module, "mlp": module}, for `model_spec`."""
  if model_spec not in SITES_BY_MODEL:
    from jaxsae.errors import JaxsaeError
    raise JaxsaeError(f"--model={model_spec}: the absorption study knows the sites of "
                      f"{sorted(SITES_BY_MODEL)}; add this model's residual and MLP modules to "
                      "experiments/absorption_study.py SITES_BY_MODEL")
  return SITES_BY_MODEL[model_spec]
# Narrower than the demo's 1,024 latents so that 262K tokens train them somewhere on a
# shared 2-core CPU; `reuse` adds runs that exist already (the demo's, 1,024 x k = 32, 1M tokens).
SWEEP = [("k", {"num_latents": 512, "k": 16}), ("k", {"num_latents": 512, "k": 32}),
         ("k", {"num_latents": 512, "k": 64}), ("width", {"num_latents": 256, "k": 32}),
         ("width", {"num_latents": 1024, "k": 32})]


def probe_data(root: str, model_spec: str, max_words: int, seed: int = 0
               ) -> absorption.ProbeData:
  """Every site's activations on the prompts, computed once and kept in ROOT/probe_data.npz."""
  path = os.path.join(root, "probe_data.npz")
  sites = list(sites_of(model_spec).values())
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      return absorption.ProbeData(words=[str(w) for w in z["words"]], token_ids=z["token_ids"],
                                  labels=z["labels"], acts={s: z[f"acts_{s}"] for s in sites},
                                  train=z["train"])
  from jaxsae import extract
  model, tok = extract.load_model(extract.model_source(model_spec))
  d = absorption.collect(model, tok, sites, max_words=max_words, seed=seed)
  buf = io.BytesIO()
  np.savez(buf, words=np.array(d.words), token_ids=d.token_ids, labels=d.labels, train=d.train,
           **{f"acts_{s}": a for s, a in d.acts.items()})
  os.makedirs(root, exist_ok=True)
  files.atomic_write_bytes(path, buf.getvalue())
  return d


def evaluate_run(run_dir: str, match_dir: str, site: str, data, probe: dict,
                 latents_file: str) -> dict:
  """Absorption of every seed of a run and, per latent, what it is and whether it is shared
  (written to `latents_file`)."""
  found = match.read(match_dir)
  summary, table, freqs = found.summary, found.latents, found.frequencies
  names = [s["name"] for s in summary["saes"]]
  per_seed, latents = [], []
  for i, s in enumerate(summary["saes"]):
    sae = formats.load_sae(s["path"])
    r = absorption.evaluate(sae, data, site, probe)
    orphan = _orphan_of(table, summary, names, i, sae.n_latents)
    main_letter, absorbing = r.pop("main_letter"), r.pop("absorbing")
    latents.append({"main": main_letter >= 0, "absorbing": absorbing > 0, "orphan": orphan,
                    "frequency": freqs[i] if freqs is not None else None,
                    "main_letter": main_letter, "absorbed_words": absorbing})
    per_seed.append({"name": s["name"], **{k: v for k, v in r.items() if k != "per_letter"},
                     "per_letter": r["per_letter"]})
  _save_latents(latents_file, names, latents)
  return {"seeds": per_seed, "latents": latents, "summary": summary}


def _save_latents(path: str, names: list[str], latents: list[dict]) -> None:
  """Per seed and latent: the letter it is a main latent of (-1: none), the test words it
  absorbed a letter on, whether it is an orphan, its firing frequency (NaN: not measured)."""
  arrays = {}
  for name, l in zip(names, latents):
    arrays.update({f"{name}_main_letter": l["main_letter"],
                   f"{name}_absorbed_words": l["absorbed_words"],
                   f"{name}_orphan": l["orphan"],
                   f"{name}_frequency": (l["frequency"] if l["frequency"] is not None
                                         else np.full(len(l["orphan"]), np.nan))})
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.atomic_write_bytes(path, buf.getvalue())


def _orphan_of(table, summary: dict, names: list[str], i: int, n: int) -> np.ndarray:
  """A latent of SAE i is an orphan when no other seed shares it (both_above at 0.7)."""
  shared = np.zeros(n, bool)
  for (a, b), pair in table.groupby(["a", "b"], sort=False):
    if names[i] == a:
      shared |= oq.shared_flags(pair, "a", "both_above", summary["threshold"])
    elif names[i] == b:
      shared |= oq.shared_flags(pair, "b", "both_above", summary["threshold"], n)
  return ~shared


def orphan_rates(latents: list[dict], decade_bins: int = 4) -> dict:
  """Orphan rate of absorbing latents, of letters' main latents, and of the other latents at the
  absorbing latents' own firing frequencies (each absorbing latent's frequency bin, 1/4
  decade, weighted as they fall)."""
  main = np.concatenate([l["main"] for l in latents])
  absorbing = np.concatenate([l["absorbing"] for l in latents])
  orphan = np.concatenate([l["orphan"] for l in latents])
  out = {"absorbing": int(absorbing.sum()), "main": int(main.sum()), "latents": len(orphan),
         "orphan_rate_all": float(orphan.mean()),
         "orphan_rate_absorbing": float(orphan[absorbing].mean()) if absorbing.any() else None,
         "orphan_rate_main": float(orphan[main].mean()) if main.any() else None}
  if latents[0]["frequency"] is None or not absorbing.any():
    return out
  freq = np.concatenate([l["frequency"] for l in latents])
  b = np.floor(np.log10(np.maximum(freq, 1e-7)) * decade_bins).astype(int)
  rest = ~absorbing & ~main
  expected = []
  for bin_ in b[absorbing]:
    same = rest & (b == bin_)
    if same.sum() >= 5:
      expected.append(orphan[same].mean())
  out["orphan_rate_same_frequency"] = float(np.mean(expected)) if expected else None
  out["frequency_matched"] = len(expected)
  return out


def _runs(trained, matched, store: str, reuse: list[tuple[str, str]], site_map: dict):
  """(site name, sweep, settings, run, its match summary), the reused runs last."""
  for name, site in site_map.items():
    for sweep, train in SWEEP:
      run_dir = trained("absorption", f"{name}_n{train['num_latents']}_k{train['k']}", store,
                        site=site, **train)
      summary = matched(run_dir, run_dir + "-match", freq_tokens=65_536, scan_tokens=0,
                        importance_tokens=0)
      yield name, sweep, train, run_dir, run_dir + "-match", summary
  for run_dir, match_dir in reuse:
    sae = formats.load_sae(saes_lib.discover([run_dir])[0])
    with open(os.path.join(match_dir, "match.json")) as f:
      summary = json.load(f)
    yield (_site_name(run_dir, site_map), "reused", {"num_latents": sae.n_latents, "k": sae.k},
           run_dir, match_dir, summary)


def _site_name(run_dir: str, site_map: dict) -> str:
  """The study's name ("resid", "mlp") of the site a reused run was trained on, from its
  run.json; "mlp" (the demo's site) when the run does not record one."""
  path = os.path.join(run_dir, "run.json")
  module = None
  if os.path.exists(path):
    with open(path) as f:
      module = json.load(f).get("site")
  if module is None:
    return "mlp"
  names = {m: name for name, m in site_map.items()}
  if module not in names:
    from jaxsae.errors import JaxsaeError
    raise JaxsaeError(f"--absorption_reuse: {run_dir} was trained on {module}, not on one of "
                      f"the study's sites {sorted(names)}")
  return names[module]


def study(root: str, model_spec: str, max_words: int, trained, matched, store: str,
          png: str, reuse: list[tuple[str, str]] = ()) -> dict:
  """`reuse`: (run, match directory) of existing runs to evaluate too, each at the site its
  run.json names (the MLP site when it names none)."""
  site_map = sites_of(model_spec)
  data = probe_data(root, model_spec, max_words)
  probes = {s: absorption.site_probe(data, s) for s in site_map.values()}
  points, latents = [], {name: [] for name in site_map}
  for name, sweep, train, run_dir, match_dir, summary in _runs(trained, matched, store, reuse,
                                                               site_map):
    site = site_map[name]
    label = f"{name}_{sweep}_n{train['num_latents']}_k{train['k']}"
    r = evaluate_run(run_dir, match_dir, site, data, probes[site],
                     os.path.join(root, "latents", label + ".npz"))
    latents[name] += r["latents"]
    seeds = r["seeds"]
    af = [s["mean_absorption_fraction"] for s in seeds if s["mean_absorption_fraction"]
          is not None]
    fa = [s["mean_full_absorption"] for s in seeds if s["mean_full_absorption"] is not None]
    points.append({
        "site": name, "module": site, "sweep": sweep, **train, "run": run_dir,
        "shared": oq.rule_point(summary, "both_above"), **oq.series(summary),
        "absorption_fraction": {"mean": float(np.mean(af)) if af else None,
                                "std": float(np.std(af)) if af else None},
        "full_absorption": {"mean": float(np.mean(fa)) if fa else None,
                            "std": float(np.std(fa)) if fa else None},
        "letters_counted": seeds[0]["letters_counted"],
        "split_features": float(np.mean([s["mean_num_split_features"] or 0 for s in seeds])),
        "orphans": orphan_rates(r["latents"]), "seeds": seeds})
    p = points[-1]
    print(f"{name} n={train['num_latents']} k={train['k']}: shared {p['shared']['mean']:.3f}, "
          f"absorption {p['absorption_fraction']['mean']}, full {p['full_absorption']['mean']}"
          f", letters {p['letters_counted']}", flush=True)
  pooled = {name: orphan_rates(ls) for name, ls in latents.items()}
  f1 = {name: [round(float(v), 3) for v in probes[s]["f1"]] for name, s in site_map.items()}
  plot(points, pooled, f1, png, MODEL_NAMES.get(model_spec, model_spec))
  return {"rows": [{"x": f"{p['site']} n{p['num_latents']} k{p['k']}",
                    "mean": p["absorption_fraction"]["mean"] or 0.0,
                    "std": p["absorption_fraction"]["std"] or 0.0} for p in points],
          "points": points, "orphans_pooled": pooled, "probe_f1": f1,
          "words": {"train": int(data.train.sum()), "test": int((~data.train).sum())},
          "min_probe_f1": absorption.MIN_PROBE_F1, "sites": site_map,
          "letters_passing": {name: int(sum(v > absorption.MIN_PROBE_F1 for v in f))
                              for name, f in f1.items()}}


def plot(points: list[dict], pooled: dict, f1: dict, png: str,
         model_name: str = "SmolLM2-135M") -> None:
  plt = oq._plt()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), dpi=120)
  ax = axes[0]
  for j, name in enumerate(f1):
    for sweep, marker in (("k", "o"), ("width", "s"), ("reused", "*")):
      ps = [p for p in points if p["site"] == name and p["sweep"] == sweep
            and p["absorption_fraction"]["mean"] is not None]
      ax.scatter([p["shared"]["mean"] for p in ps], [p["absorption_fraction"]["mean"] for p in ps],
                 color=f"C{j}", marker=marker, label=f"{name}, {sweep} sweep")
      for p in ps:
        ax.annotate(f"n{p['num_latents']} k{p['k']}", (p["shared"]["mean"],
                    p["absorption_fraction"]["mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
  ax.set_xlabel("fraction of latents shared between seeds (both_above, 0.7)")
  ax.set_ylabel("mean absorption fraction (letters with probe F1 > 0.6)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title("Absorption against sharing, per SAE run")
  bx = axes[1]
  keys = [("orphan_rate_absorbing", "absorbing latents"), ("orphan_rate_same_frequency",
          "other latents, same frequency"), ("orphan_rate_main", "letters' main latents"),
          ("orphan_rate_all", "all latents")]
  for j, name in enumerate(f1):
    vals = [pooled[name].get(k) or 0.0 for k, _ in keys]
    bx.bar(np.arange(len(keys)) + 0.4 * j, vals, width=0.4, color=f"C{j}", label=name)
  bx.set_xticks(np.arange(len(keys)) + 0.2, [lab for _, lab in keys], fontsize=7, rotation=15)
  bx.set_ylabel("orphan rate (no other seed shares it)")
  bx.set_ylim(0, 1)
  bx.legend(fontsize=8)
  bx.set_title("Are absorbing latents orphans more often?")
  cx = axes[2]
  for j, name in enumerate(f1):
    cx.bar(np.arange(26) + 0.4 * j, f1[name], width=0.4, color=f"C{j}", label=name)
  cx.axhline(absorption.MIN_PROBE_F1, color="gray", ls="--", lw=1)
  cx.set_xticks(range(26), list(absorption.LETTERS), fontsize=7)
  cx.set_ylabel("letter probe F1 (test words)")
  cx.set_ylim(0, 1)
  cx.legend(fontsize=8)
  cx.set_title(f"Is {model_name} fit for the metric?")
  fig.tight_layout()
  fig.savefig(png)


def load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def probe_f1(model_spec: str, sites: list[str], max_words: int, seed: int = 0) -> dict:
  """The letter probes alone (the metric's precondition, no SAE): test F1 per letter at each of
  `sites` (module paths or shorthand such as resid:9), from one prompting pass."""
  import time
  from jaxsae import extract
  t0 = time.time()
  model, tok = extract.load_model(extract.model_source(model_spec))
  modules = [p if w == "output" else f"{p}:input" for p, w in extract.resolve_sites(model, sites)]
  t1 = time.time()
  data = absorption.collect(model, tok, modules, max_words=max_words, seed=seed)
  t2 = time.time()
  out = {"model": model_spec, "words": {"train": int(data.train.sum()),
                                        "test": int((~data.train).sum())}, "sites": {}}
  for site, module in zip(sites, modules):
    f1 = np.asarray(absorption.site_probe(data, module)["f1"])
    passing = "".join(absorption.LETTERS[i] for i in np.nonzero(f1 > absorption.MIN_PROBE_F1)[0])
    out["sites"][site] = {"module": module, "f1": [round(float(v), 3) for v in f1],
                          "passing": passing, "median_f1": round(float(np.median(f1)), 3)}
    print(f"{site:>9} {module:<22} {len(passing):2d} letters > {absorption.MIN_PROBE_F1} "
          f"({passing}), median F1 {np.median(f1):.3f}", flush=True)
  out["seconds"] = {"load": round(t1 - t0, 1), "prompts": round(t2 - t1, 1),
                    "probes": round(time.time() - t2, 1)}
  return out


if __name__ == "__main__":
  # python -m experiments.absorption_study --model=gemma-3-270m --sites=resid:9,mlp:9
  #     --words=4800 --out=out/experiments/gemma/probes.json
  from absl import app
  from absl import flags
  _M = flags.DEFINE_string("model", "smollm2", "Model (see `jaxsae extract --model`).")
  _S = flags.DEFINE_list("sites", ["resid:-1"], "Sites to probe (module paths or shorthand).")
  _W = flags.DEFINE_integer("words", 1200, "Alphabetic tokens prompted (0: every one).")
  _O = flags.DEFINE_string("out", "", "JSON file for the F1s (none: printed only).")

  def main(_):
    res = probe_f1(_M.value, _S.value, _W.value)
    print(res["words"], res["seconds"])
    if _O.value:
      files.atomic_write_bytes(_O.value, json.dumps(res, indent=1).encode())
  app.run(main)
