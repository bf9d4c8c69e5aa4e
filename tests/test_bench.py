"""A tiny smoke run of each benchmark: they are commands, so CI only checks that they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_bench_train_smoke(tmp_path):
  _run("bench_train.py", "--d_in=32", "--num_latents=256", "--k=8", "--batch_size=256",
       "--seeds=1,2", "--steps=3", "--warmup=1", f"--out={tmp_path / 'r.json'}")
  rows = json.load(open(tmp_path / "r.json"))
  assert [r["seeds"] for r in rows] == [1, 2]
  for r in rows:
    assert r["jaxsae_tok_s_per_seed"] > 0 and r["sparsify_tok_s_per_seed"] > 0
    assert 0 < r["jaxsae_fvu"] < 1.5 and 0 < r["sparsify_fvu"] < 1.5


def test_bench_match_smoke():
  out = _run("bench_match.py", "--sizes=256", "--instances=planted", "--d_in=32")
  assert "256" in out and "sparse" in out
