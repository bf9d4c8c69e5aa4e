"""`jaxsae demo` end to end at a tiny scale, and the experiment driver's sweeps."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import planted_sparse

from jaxsae import demo
from jaxsae import match
from jaxsae import store as store_lib
from jaxsae import store_writer


def tiny_demo_flags(model_dir: str, text_dir: str) -> dict:
  return dict(model=model_dir, dataset=text_dir, site="model.layers.2.mlp", num_tokens=16384,
              ctx_len=64, num_seeds=3, num_latents=64, k=4, train_tokens=16384, batch_size=128,
              lr=4e-3, lr_warmup_steps=5)


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_every_stage(tiny_model_dir, text_dir, tmp_path, capsys):
  cfg = demo.DemoConfig(out=str(tmp_path / "demo"), **tiny_demo_flags(tiny_model_dir, text_dir))
  summary = demo.run(cfg)
  out = capsys.readouterr().out
  for stage in ("[1/4] extract", "[2/4] train 3 TopK seeds", "[3/4] match all 3 pairs",
                "[4/4] report"):
    assert stage in out

  # The headline is the summary's own number, and the report it points at holds it too.
  headline = re.search(r"mean over 3 pairs \(threshold 0.7\): ([0-9.]+) \+- ([0-9.]+)", out)
  assert headline, out
  assert float(headline[1]) == pytest.approx(summary["fraction_shared_mean"], abs=5e-4)
  assert 0.0 <= summary["fraction_shared_mean"] <= 1.0
  assert len(summary["pairs"]) == 3
  assert {p["n_latents"] for p in summary["pairs"]} == {64}
  mcc = re.search(r"PW-MCC, no threshold\): decoder ([0-9.]+)", out)
  assert mcc and float(mcc[1]) == pytest.approx(summary["decoder_mcc_mean"], abs=5e-4)
  report_path = re.search(r"report: (\S+report\.html)", out)[1]
  html = open(report_path).read()
  assert f"{summary['fraction_shared_mean']:.3f}" in html
  assert html.count("data:image/png;base64,") >= 4
  # The training line states the FVU that shows whether training had levelled off.
  fvu = re.search(r"mean FVU ([0-9.]+) at ([0-9,]+) tokens, ([0-9.]+) at ([0-9,]+)", out)
  assert fvu and float(fvu[3]) < 1.0 and int(fvu[4].replace(",", "")) == 16384
  store = store_lib.Store(str(tmp_path / "demo" / "store"))
  assert store.num_tokens >= 16384 - 64 * 8  # BOS positions are not stored

  # A rerun reuses the store, the seeds and the match, and says so.
  mtimes = {p: os.path.getmtime(tmp_path / "demo" / p)
            for p in ("store/manifest.json", "run/seed0/sae.safetensors", "match/match.json")}
  again = demo.run(cfg)
  out = capsys.readouterr().out
  assert out.count("done before") == 3
  assert again["fraction_shared_mean"] == summary["fraction_shared_mean"]
  assert mtimes == {p: os.path.getmtime(tmp_path / "demo" / p) for p in mtimes}


def test_demo_cli_overrides_reach_each_stage(forks, tiny_model_dir, text_dir, tmp_path):
  """`jaxsae demo --flag=...`: bad sizes are one clear line before any work is done."""
  flags = tiny_demo_flags(tiny_model_dir, text_dir)
  args = [f"--{k}={v}" for k, v in {**flags, "k": 64}.items()]
  proc = forks.run("demo", f"--out={tmp_path}/d", *args, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("jaxsae demo: error: --k=64"), \
      proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "d" / "store" / "manifest.json")


# ---------------------------------------------------------------------------------------------
# python -m experiments.run


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
  x, _ = planted_sparse(8192, 16, 24, 3, seed=1)
  path = str(tmp_path_factory.mktemp("planted") / "store")
  store_writer.write_store(path, (x + 0.5).astype(np.float32), rows_per_shard=1024)
  return path


def drive(*argv: str) -> str:
  """`python -m experiments.run ARGV` in this process, its stdout returned: the flags parsed
  from ARGV as from a command line (every other flag at its default), then the driver's main.
  One process for a test's studies imports jax, torch and matplotlib once and compiles the
  match's programs once per shape; test_experiment_sweep_and_figures runs the command itself."""
  from absl import flags
  from absl import logging as absl_logging
  from experiments import run as driver
  verbosity = absl_logging.get_verbosity()  # main quiets absl; the worker's level is restored
  flags.FLAGS.unparse_flags()
  out = io.StringIO()
  try:
    rest = flags.FLAGS(["experiments.run", *argv])
    with contextlib.redirect_stdout(out):
      driver.main(rest)
  finally:
    flags.FLAGS.unparse_flags()
    absl_logging.set_verbosity(verbosity)
  return out.getvalue()


def run_study(study: str, store: str, out: str, *extra: str) -> dict:
  stdout = drive(f"--study={study}", f"--store={store}", f"--out={out}", "--num_seeds=3",
                 "--k=3", "--num_latents=32", "--num_tokens=32768", "--batch_size=128",
                 "--lr=0.01", "--lr_warmup_steps=5", *extra)
  assert f"wrote {out}/{study}/results.json" in stdout
  png = os.path.join(out, study, f"{study}.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 10_000  # axes, a curve and error bars, not an empty canvas
  with open(os.path.join(out, study, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_experiment_sweep_and_figures(forks, planted_store, tmp_path):
  """The size sweep on a planted dictionary of 24 directions, then the threshold curve."""
  out = str(tmp_path / "exp")
  res = run_study("size", planted_store, out, "--sizes=24,96")
  rows = {r["x"]: r for r in res["rows"]}
  assert set(rows) == {24, 96} and all(r["pairs"] == 3 for r in rows.values())
  # 24 latents for 24 planted directions: seeds recover much the same dictionary (0.61 here).
  # Four times as many latents split it differently from seed to seed (0.20): the paper's
  # effect in miniature.
  assert rows[24]["mean"] > 0.5
  assert rows[96]["mean"] < rows[24]["mean"] - 0.2
  assert res["paper"]["x"] == [768, 4096, 32768, 131072]
  assert res["paper"]["bijections_agree"] == [0.949, 0.916, 0.793, 0.702]
  for size, r in rows.items():  # each point's series: what `jaxsae match` wrote for its run
    with open(os.path.join(out, "size", f"num_latents{size}-match", "match.json")) as f:
      for key, value in _series_of(json.load(f)).items():
        assert r[key]["mean"] == pytest.approx(value, abs=1e-12), (size, key)

  # Another results.json of the study drawn beside this one's (the runs are reused, not
  # retrained); one of another study is refused before anything trains, by the command itself
  # (started here, beside the studies below; its verdict is read at the end).
  first = str(tmp_path / "size-first.json")
  shutil.copy(os.path.join(out, "size", "results.json"), first)
  refused = forks.start("--study=threshold", f"--store={planted_store}",
                        f"--out={tmp_path / 'refused'}", f"--beside=size={first}",
                        module="experiments.run")  # `python -m experiments.run`, forked
  res = run_study("size", planted_store, out, "--sizes=24,96", f"--beside=first={first}",
                  "--label=again")
  assert res["beside"] == [f"first={first}"] and res["label"] == "again"
  assert [r["mean"] for r in res["rows"]] == [rows[24]["mean"], rows[96]["mean"]]

  # The base run of the threshold and frequency studies has the settings of the size study's
  # 24-latent point: the same programs, compiled once where XLA's cache is on (conftest.py).
  res = run_study("threshold", planted_store, out, "--num_latents=24")
  means = [r["mean"] for r in res["rows"]]
  assert [r["x"] for r in res["rows"]][0] == 0.5 and len(means) == 9
  assert all(a >= b for a, b in zip(means, means[1:]))  # a stricter threshold shares fewer
  base = os.path.join(out, "shared", "base-match")
  with open(os.path.join(base, "match.json")) as f:
    base_match = json.load(f)
  whole = _series_of(base_match)
  for r in res["rows"]:  # threshold-free, so every threshold carries the whole run's
    assert {k: r[k]["mean"] for k in whole} == pytest.approx(whole, abs=1e-12)
    assert r["agree_rule"]["mean"] <= r["mean"]
  at_07 = next(r for r in res["rows"] if r["x"] == base_match["threshold"])
  assert at_07["mean"] == pytest.approx(base_match["rules"]["both_above"]["mean"], abs=1e-12)
  assert at_07["agree_rule"]["mean"] == pytest.approx(base_match["rules"]["agree"]["mean"],
                                                      abs=1e-12)

  # Frequency bins (the same base run) carry the series restricted to their latents: counted
  # here with pandas from latents.csv, per pair, then averaged over the pairs.
  res = run_study("frequency", planted_store, out, "--num_latents=24")
  latents = pd.read_csv(os.path.join(base, "latents.csv"))
  edges = np.logspace(-6, 0, 13)
  latents["bin"] = np.digitize(latents["frequency"], edges) - 1
  counted = 0
  for i, r in enumerate(res["rows"]):
    per_pair = latents[latents["bin"] == i].groupby(["a", "b"])
    if r["mean"] is None or per_pair.size().min() < 5:
      continue
    by_hand = per_pair[["agree", "dec_cos", "enc_cos"]].mean().mean()
    for key, col in (("bijections_agree", "agree"), ("decoder_mcc", "dec_cos"),
                     ("encoder_mcc", "enc_cos")):
      assert r[key]["mean"] == pytest.approx(by_hand[col], abs=1e-6), (i, key)
    counted += 1
  assert counted >= 1

  err = refused.completed(timeout=300).stderr
  assert refused.returncode != 0 and "holds the 'size' study, not 'threshold'" in err
  assert not os.path.exists(tmp_path / "refused" / "threshold")


@pytest.mark.slow
def test_open_question_studies_run_end_to_end(planted_store, tmp_path):
  """Each open-question study trains, matches and draws on a planted store; the numbers are
  pinned where the setup decides them (pair counts, which run feeds which study)."""
  out = str(tmp_path / "exp")
  # Half the sweeps' tokens (128 steps): what is checked here is the setup, not how far each
  # run went. k=4 throughout, the matryoshka study's: its topk run then has the settings of
  # the trajectory's 8,192-token run, the same programs.
  sizes = ["--k=4", "--num_tokens=16384"]
  census = [*sizes, "--census_seeds=4", "--snapshots=4096,8192"]
  res = run_study("census", planted_store, out, *census)
  assert [r["x"] for r in res["rows"]] == [1, 2, 3, 4]
  assert sum(r["mean"] for r in res["rows"]) == pytest.approx(1.0)
  assert res["census"]["agree"]["num_saes"] == 4 and res["decoder_mcc"]["mean"] > 0

  # The trajectory reuses the census run's snapshots (no second 4-seed run) and adds one
  # full-schedule run per length.
  res = run_study("trajectory", planted_store, out, *census)
  assert [r["tokens"] for r in res["snapshots"]] == [4096, 8192, 16384]
  assert [r["tokens"] for r in res["full_schedule"]] == [4096, 8192, 16384]
  assert all(r["shared"]["pairs"] == 6 for r in res["snapshots"])
  assert all(r["shared"]["pairs"] == 3 for r in res["full_schedule"][:-1])

  res = run_study("init_vs_data", planted_store, out, *sizes, "--grid=2")
  assert {k: v["pairs"] for k, v in res["kinds"].items()} == {"init": 2, "data": 2, "both": 2}

  res = run_study("matryoshka", planted_store, out, *sizes, "--num_latents=32",
                  "--arch_tokens=8192")
  assert [r["x"] for r in res["rows"]] == ["topk", "batchtopk", "matryoshka"]
  assert res["bounds"] == [[0, 2], [2, 4], [4, 8], [8, 16], [16, 32]]
  assert all(r["l0"] == [4.0] * 3 for r in res["overall"][:1])  # topk: exactly k per token


def _series_of(match_json: dict) -> dict:
  """The threshold-free views as `jaxsae match` itself summarises them."""
  return {"bijections_agree": match_json["fraction_agree_mean"],
          "decoder_mcc": match_json["decoder_mcc_mean"],
          "encoder_mcc": match_json["encoder_mcc_mean"]}


@pytest.mark.slow
def test_layers_and_sites_studies_on_one_multi_site_store(tiny_model_dir, text_dir, tmp_path):
  """Both depth studies read one extraction of MLP output and residual stream at each layer,
  share the MLP runs, and report per point the series `jaxsae match` reports for that run."""
  out = str(tmp_path / "exp")
  # 8,192 training tokens per run (64 steps, about one pass over the store): what is checked
  # is which runs feed which study and what each reports, not how far they went.
  depth = ["--model=" + tiny_model_dir, "--dataset=" + text_dir, "--layers=0,2,-1",
           "--depth_extract_tokens=8192", "--ctx_len=64", "--num_tokens=8192"]
  res = run_study("layers", "", out, *depth)
  assert [(r["kind"], r["layer"]) for r in res["rows"]] == [("mlp", 0), ("mlp", 2), ("mlp", 3)]
  assert [r["depth"] for r in res["rows"]] == pytest.approx([0.0, 2 / 3, 1.0])
  assert set(res["paper"]["by_size"]) == {"768", "4096", "32768"}
  store = store_lib.Store(res["depth_store"])
  assert store.sites == ["model.layers.0.mlp", "model.layers.2.mlp", "model.layers.3.mlp",
                         "model.layers.0", "model.layers.2", "model.layers.3"]
  trained_mlp = os.path.getmtime(os.path.join(out, "layers", "mlp0", "seed0"))

  res = run_study("sites", "", out, *depth)
  assert [r["x"] for r in res["rows"]] == ["mlp@0", "mlp@2", "mlp@3", "resid@0", "resid@2",
                                           "resid@3"]
  assert os.path.getmtime(os.path.join(out, "layers", "mlp0", "seed0")) == trained_mlp
  for r in res["rows"]:
    assert r["mean"] == r["decoder"]["mean"] and r["pairs"] == 3
    assert 0 < r["outliers"]["top_dim_variance"] <= 1

  # The driver's series against a fresh `jaxsae match` of the same run (what the command runs).
  run_dir = os.path.join(out, "layers", "resid2")
  fresh = str(tmp_path / "fresh-match")
  match.run(match.MatchConfig(inputs=(run_dir,), out=fresh, freq_tokens=0))
  with open(os.path.join(fresh, "match.json")) as f:
    reported = json.load(f)
  row = next(r for r in res["rows"] if r["x"] == "resid@2")
  for key, value in _series_of(reported).items():
    assert row[key]["mean"] == pytest.approx(value, abs=1e-12), key
  assert row["both_above"]["mean"] == pytest.approx(reported["rules"]["both_above"]["mean"])
  assert row["decoder"]["mean"] == pytest.approx(reported["rules"]["decoder"]["mean"])
