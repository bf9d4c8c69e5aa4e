"""experiments/ground_truth.py: its sweeps and what it calls each orphan, on hand-made SAEs."""

from __future__ import annotations

import numpy as np

from conftest import save_sae
from experiments import ground_truth as gt


def test_points_cover_the_five_sweeps_around_one_centre():
  pts = gt.points(gt.REDUCED)
  assert {p["sweep"] for p in pts} == {"width", "k", "superposition", "length", "structure"}
  centre = [p for p in pts if p["train"] == {"num_latents": 512, "k": 8,
                                              "num_tokens": 1_048_576}
            and p["store"] == gt.store_spec(gt.REDUCED)]
  assert len(centre) == 5  # one point of every sweep is the same run, trained once
  assert {gt.store_name(p["store"]) for p in pts} >= {"d64_N512_l08", "d64_N512_l08_h16x4",
                                                      "d64_N512_l08_c0.3"}


def test_orphans_are_named_by_the_truth(tmp_path):
  from jaxsae import match
  from jaxsae import synthetic
  rng = np.random.default_rng(0)
  t = synthetic.features(32, 16, rng)
  save_sae(str(tmp_path / "truth"), t, np.zeros(16), t, np.zeros(32), k=2)
  a = t.copy()
  b = t[rng.permutation(16)].copy()
  j = int(np.nonzero(np.all(b == t[3], axis=1))[0][0])
  b[j] = (t[3] + t[5] + t[7]) / np.sqrt(3)  # b merges 3, 5 and 7 and so lacks feature 3
  for name, w in (("a", a), ("b", b)):
    save_sae(str(tmp_path / name), w, np.zeros(16), w, np.zeros(32), k=2)
  match.run(match.MatchConfig(inputs=(str(tmp_path / "a"), str(tmp_path / "b")),
                              out=str(tmp_path / "m"), freq_tokens=0, scan_tokens=0,
                              importance_tokens=0))
  o = gt.orphan_kinds(str(tmp_path / "m"), str(tmp_path / "truth"))
  # One orphan per side: a's feature 3, which b missed, and b's merge.
  assert o["orphan_fraction"] == 1 / 16
  assert o["missed"] == 0.5 and o["merged"] == 0.5
