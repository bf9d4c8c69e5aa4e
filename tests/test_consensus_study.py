"""experiments/consensus_study.py: the consensus sweep, importance by group, and a run that
starts from a consensus dictionary, on a tiny trained run."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import planted_sparse, train_config
from experiments import consensus_study as cs
from jaxsae import match
from jaxsae import saes
from jaxsae import store_writer
from jaxsae import train

pytestmark = pytest.mark.xdist_group("consensus study")  # one worker trains and sweeps once


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cstudy")
  x, _ = planted_sparse(4096, 16, 24, 3, 0)
  store_writer.write_store(str(tmp / "store"), x.astype(np.float32), rows_per_shard=1024)
  run = tmp / "run"
  train.run(train_config(tmp / "store", run, num_latents=32, k=3, seeds=(0, 1, 2)))
  match.run(match.MatchConfig(inputs=(str(run),), out=str(tmp / "m"), freq_tokens=1024,
                              scan_tokens=0))
  return tmp


@pytest.fixture(scope="module")
def swept(matched):
  """The sweep's table; it writes the consensus dictionaries under matched/c."""
  return cs.table(cs.sweep(str(matched / "m"), str(matched / "c"), 3, eval_tokens=512))


def test_sweep_and_importance(matched, swept):
  rows = swept
  assert [r["min_seeds"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
  widths = [r["width"] for r in rows]
  assert widths == sorted(widths, reverse=True) and widths[0] >= 32
  imp = cs.importance_by_group(str(matched / "m"))
  assert sum(p["n"] for p in imp["by_group_size"]) == 3 * 32


def test_a_run_from_a_consensus_starts_at_it(matched, swept):
  cons = str(matched / "c" / "m2")
  c = saes.load_sae(cons)
  # A learning rate too small to move anything: the run ends where it started.
  cfg = train_config(matched / "store", matched / "further", num_latents=c.n_latents, k=c.k,
                     seeds=(0,), num_tokens=128 * 4, lr=1e-12, checkpoint_every=100)
  cs.init_from(cons, cfg)
  train.run(cfg)
  end = saes.load_sae(str(matched / "further" / "seed0"))
  for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
    np.testing.assert_allclose(getattr(end, key), getattr(c, key), atol=1e-5, err_msg=key)
  d = cs.drift(c.W_dec, end.W_dec)
  assert d["mean_cos"] == pytest.approx(1.0, abs=1e-6)
  rand = train_config(matched / "store", matched / "rand", num_latents=c.n_latents, k=c.k,
                      seeds=(0,), num_tokens=128 * 4, lr=1e-12)
  train.run(rand)
  start = cs.initial_decoder(rand)
  np.testing.assert_allclose(saes.load_sae(str(matched / "rand" / "seed0")).W_dec, start,
                             atol=1e-5)
