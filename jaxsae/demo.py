"""The whole pipeline on the offline default: SmolLM2-135M, Wikipedia + Django docs, on a CPU.

  jaxsae demo [--out=out/demo] [--num_seeds=4] [--num_latents=2048] ...

Extracts the layer-15 MLP output of SmolLM2-135M-Instruct (the site the paper used for
SmolLM-135M), trains 4 TopK seeds at once, matches every pair, and writes the report. Each
stage reuses what a previous run finished (the store, the trained seeds, the match), so a
rerun after an interruption picks up where it stopped; the training itself resumes from its
newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from jaxsae import extract
from jaxsae import formats
from jaxsae import match
from jaxsae import report
from jaxsae import store as store_lib
from jaxsae import train
from jaxsae.config import field
from jaxsae.errors import JaxsaeError


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Flags of `jaxsae demo`: each stage's main settings, sized for a 2-core CPU."""

  out: str = field("out/demo", "Directory for everything the demo writes: store/, run/, match/, "
                   "report/.")
  model: str = field(extract.DEFAULT_MODEL, "Model to extract from (see `jaxsae extract`).")
  site: str = field("model.layers.15.mlp", "Site to extract: the paper's SmolLM-135M site.")
  dataset: str = field("default", "Corpus (see `jaxsae extract`).")
  num_tokens: int = field(262_144, "Tokens of activations to extract.")
  ctx_len: int = field(256, "Extraction window.")
  num_seeds: int = field(4, "SAE seeds trained at once.")
  num_latents: int = field(1024, "Latents per SAE.")
  k: int = field(32, "Active latents per token (TopK).")
  train_tokens: int = field(4_194_304, "Training tokens per seed (the store is reused in "
                            "reshuffled epochs: 16 passes over the default store).")
  batch_size: int = field(1024, "Tokens per training batch.")
  lr: float = field(8e-3, "Adam learning rate. The paper's recipe (2e-4 / sqrt(n / 2^14), "
                    "batches of 16,384) is for billions of tokens; in a few million, its SAEs "
                    "barely leave their random initialisation and share almost nothing (0.000 "
                    "at 2,048 latents here), so the demo takes more, smaller steps at a higher "
                    "rate (experiments/README.md, 'The demo's recipe', for how it was chosen).")
  lr_warmup_steps: int = field(50, "Learning-rate warmup steps (the paper's 1,000 is for runs of "
                               "hundreds of thousands of steps).")
  threshold: float = field(0.7, "Cosine threshold for a shared latent.")


def _complete_store(path: str) -> bool:
  try:
    store_lib.Store(path)
    return True
  except JaxsaeError:
    return False


def _fvu_curve(run_dir: str) -> list[tuple[int, float]]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["tokens_per_seed"], sum(r["fvu"]) / len(r["fvu"])) for r in rows]


def check(cfg: DemoConfig) -> None:
  """The demo's settings that would fail a later stage, refused before the extraction runs."""
  if cfg.num_seeds < 2:
    raise JaxsaeError(f"--num_seeds={cfg.num_seeds}: matching needs at least 2 seeds")
  if not 0 < cfg.k < cfg.num_latents:
    raise JaxsaeError(f"--k={cfg.k} must be between 1 and num_latents-1 ({cfg.num_latents - 1})")
  if not 0 < cfg.batch_size <= cfg.train_tokens:
    raise JaxsaeError(f"--batch_size={cfg.batch_size} must be positive and at most "
                      f"--train_tokens={cfg.train_tokens}")
  if not -1 <= cfg.threshold <= 1:
    raise JaxsaeError(f"--threshold={cfg.threshold} is a cosine: it must be in [-1, 1]")


def run(cfg: DemoConfig) -> dict:
  check(cfg)
  t0 = time.time()
  store_dir, run_dir = os.path.join(cfg.out, "store"), os.path.join(cfg.out, "run")
  match_dir, report_dir = os.path.join(cfg.out, "match"), os.path.join(cfg.out, "report")

  print(f"[1/4] extract {cfg.num_tokens:,} tokens of {cfg.site} -> {store_dir}", flush=True)
  if _complete_store(store_dir):
    print("      done before: reusing the store")
  else:
    extract.run(extract.ExtractConfig(model=cfg.model, dataset=cfg.dataset, sites=(cfg.site,),
                                      num_tokens=cfg.num_tokens, ctx_len=cfg.ctx_len,
                                      out=store_dir))

  print(f"[2/4] train {cfg.num_seeds} TopK seeds ({cfg.num_latents} latents, k={cfg.k}) on "
        f"{cfg.train_tokens:,} tokens each -> {run_dir}", flush=True)
  last = os.path.join(run_dir, f"seed{cfg.num_seeds - 1}")
  if formats.is_sae_dir(last):
    print("      done before: reusing the trained seeds")
  else:
    train.run(train.TrainConfig(
        store=store_dir, out=run_dir, arch="topk", num_latents=cfg.num_latents, k=cfg.k,
        num_seeds=cfg.num_seeds, num_tokens=cfg.train_tokens, batch_size=cfg.batch_size,
        lr=cfg.lr, lr_warmup_steps=cfg.lr_warmup_steps, checkpoint_every=500))
  curve = _fvu_curve(run_dir)

  print(f"[3/4] match all {cfg.num_seeds * (cfg.num_seeds - 1) // 2} pairs -> {match_dir}",
        flush=True)
  summary_path = os.path.join(match_dir, match.SUMMARY_FILE)
  summary = None
  if os.path.exists(summary_path) and os.path.getmtime(summary_path) > os.path.getmtime(
      os.path.join(last, formats.CFG_FILE)):
    with open(summary_path) as f:
      summary = json.load(f)
    # A match from before the match measured the report's contexts and importance is redone.
    summary = summary if "scan_tokens" in summary else None
  if summary is not None:
    print("      done before: reusing the match")
  else:
    summary = match.run(match.MatchConfig(inputs=(run_dir,), out=match_dir,
                                          threshold=cfg.threshold))

  print(f"[4/4] report -> {report_dir}", flush=True)
  report.run(report.ReportConfig(inputs=(match_dir,), out=report_dir))

  half = min(curve, key=lambda c: abs(c[0] - curve[-1][0] / 2))
  rules = summary["rules"]
  print()
  model = "SmolLM2-135M" if cfg.model == extract.DEFAULT_MODEL else cfg.model
  print(f"{model} {cfg.site}, {cfg.num_seeds} TopK SAEs x {cfg.num_latents} latents, "
        f"k={cfg.k}, {cfg.train_tokens:,} tokens each (batch {cfg.batch_size}, lr {cfg.lr})")
  change = (curve[-1][1] - half[1]) / half[1]
  print(f"  training: mean FVU {half[1]:.3f} at {half[0]:,} tokens, {curve[-1][1]:.3f} at "
        f"{curve[-1][0]:,} ({100 * change:+.0f}% over the second half)")
  print(f"  fraction of latents shared, mean over {len(summary['pairs'])} pairs "
        f"(threshold {cfg.threshold}): {summary['fraction_shared_mean']:.3f} "
        f"+- {summary['fraction_shared_std']:.3f} (both bijections agree)")
  print("  other rules: " + ", ".join(f"{r} {v['mean']:.3f}" for r, v in rules.items()))
  if "decoder_mcc_mean" in summary:  # a match reused from before PW-MCC has none
    print(f"  mean matched cosine (PW-MCC, no threshold): decoder "
          f"{summary['decoder_mcc_mean']:.3f} +- {summary['decoder_mcc_std']:.3f}, encoder "
          f"{summary['encoder_mcc_mean']:.3f} +- {summary['encoder_mcc_std']:.3f}")
  print(f"  report: {os.path.abspath(os.path.join(report_dir, 'report.html'))}")
  print(f"  ({time.time() - t0:.0f} s)")
  return summary
