"""How much of a known dictionary an SAE recovers: SAEs matched against the truth, not each other.

  jaxsae truth RUN | SAE_DIR [...] --truth=STORE/truth --out=DIR

For a true dictionary T (`jaxsae synth` writes one beside its store) and an SAE's decoder rows
D, both unit-normalised:

  recovered@t   the fraction of true features that some decoder row reaches at cosine >= t
                (t = 0.7, the sharing threshold, and 0.9); no bijection, as SynthSAEBench
  PW-MCC        the mean cosine of the optimal one-to-one matching of D to T (assign.py), over
                min(n, N) pairs: the same number `jaxsae match` reports between seeds

Per latent, `classify` says what each decoder row is in terms of the truth: `aligned` (a true
feature at cosine >= t), `merged` (no single feature reaches t, but a nonnegative combination
of two or more does), `split` (neither, and its nearest feature is also another latent's), or
`other`. Writes DIR/truth.json (one entry per SAE).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from jaxsae import assign as assign_lib
from jaxsae import files
from jaxsae import formats
from jaxsae import saes as saes_lib
from jaxsae.config import field
from jaxsae.errors import JaxsaeError

THRESHOLDS = (0.7, 0.9)
SUMMARY_FILE = "truth.json"
KINDS = ("aligned", "merged", "split", "other")


@dataclasses.dataclass(frozen=True)
class TruthConfig:
  """Flags of `jaxsae truth`."""
  inputs: tuple[str, ...] = field((), "a jaxsae run directory (all its seeds), or SAE directories",
                                  positional=True)
  truth: str = field("", "the true dictionary: an SAE directory, e.g. the truth/ that jaxsae "
                     "synth writes inside its store")
  out: str = field("", "directory for truth.json")
  threshold: float = field(0.7, "the cosine at which a latent counts as a true feature's "
                           "(classify; recovery is also reported at 0.9)")


def cosines(dec: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """[n, N] cosines of decoder rows with true features."""
  return assign_lib.unit_rows(dec) @ assign_lib.unit_rows(truth).T


def recovery(dec: np.ndarray, truth: np.ndarray, thresholds=THRESHOLDS) -> dict:
  """Recovery of the true rows `truth` [N, d] by decoder rows `dec` [n, d], and PW-MCC."""
  a = assign_lib.assign(assign_lib.unit_rows(truth), assign_lib.unit_rows(dec))
  best = cosines(dec, truth).max(axis=0)
  return {**{f"recovered_{t}": float((best >= t).mean()) for t in thresholds},
          "mcc": float(a.objective / min(len(dec), len(truth))),
          "best_cos": best, "partner": a.cols, "partner_cos": a.cos}


def classify(dec: np.ndarray, truth: np.ndarray, threshold: float = 0.7,
             candidates: int = 5) -> dict[str, np.ndarray]:
  """Per decoder row: its kind (an index into KINDS), nearest true feature and cosine."""
  from scipy.optimize import nnls
  sim = cosines(dec, truth)
  near = sim.argmax(axis=1)
  cos = sim[np.arange(len(dec)), near]
  t_unit = assign_lib.unit_rows(truth)
  u_unit = assign_lib.unit_rows(dec)
  kind = np.full(len(dec), KINDS.index("other"))
  kind[cos >= threshold] = KINDS.index("aligned")
  owners = np.bincount(near[cos >= 0.3], minlength=len(truth))
  for i in np.nonzero(cos < threshold)[0]:
    top = np.argsort(-sim[i])[:candidates]
    w, _ = nnls(t_unit[top].T, u_unit[i])
    fit = t_unit[top].T @ w
    fit_cos = float(fit @ u_unit[i] / max(np.linalg.norm(fit), 1e-12))
    if fit_cos >= threshold and (w > 0.2 * w.max()).sum() >= 2:
      kind[i] = KINDS.index("merged")
    elif cos[i] >= 0.3 and owners[near[i]] >= 2:
      kind[i] = KINDS.index("split")
  return {"kind": kind, "nearest": near, "cos": cos}


def _check(cfg: TruthConfig) -> None:
  if not cfg.out:
    raise JaxsaeError("--out is required: the directory for truth.json")
  if not cfg.truth:
    raise JaxsaeError("--truth is required: the true dictionary's SAE directory (jaxsae synth "
                      "writes it as STORE/truth)")


def run(cfg: TruthConfig) -> dict:
  _check(cfg)
  t0 = time.time()
  truth = formats.load_sae(cfg.truth, name="truth")
  out = {"truth": os.path.abspath(cfg.truth), "threshold": cfg.threshold, "saes": []}
  for path in saes_lib.discover(cfg.inputs):  # one SAE is enough here, unlike a match
    sae = formats.load_sae(path)
    if sae.d_in != truth.d_in:
      raise JaxsaeError(f"{sae.path} has d_in={sae.d_in} but the truth {cfg.truth} has "
                        f"{truth.d_in}; pass the truth of the store these SAEs trained on")
    r = recovery(sae.W_dec, truth.W_dec)
    c = classify(sae.W_dec, truth.W_dec, cfg.threshold)
    out["saes"].append({"name": sae.name, "path": os.path.abspath(sae.path),
                        "n_latents": sae.n_latents,
                        **{k: v for k, v in r.items() if not isinstance(v, np.ndarray)},
                        "kinds": {k: float((c["kind"] == i).mean())
                                  for i, k in enumerate(KINDS)}})
  out["seconds"] = round(time.time() - t0, 2)
  os.makedirs(cfg.out, exist_ok=True)
  files.atomic_write_json(os.path.join(cfg.out, SUMMARY_FILE), out)
  for s in out["saes"]:
    print(f"{s['name']}: recovered {s['recovered_0.7']:.3f} (>= 0.7), {s['recovered_0.9']:.3f} "
          f"(>= 0.9) of {truth.n_latents} true features; PW-MCC {s['mcc']:.3f}")
  print(f"jaxsae truth: wrote {os.path.join(cfg.out, SUMMARY_FILE)}")
  return out
