"""Bad flags and files for every subcommand, through the real command line: each is one clear
error line (a JaxsaeError, or absl's flag-parsing line), never a traceback. Generated damaged
manifests and cfg.json files: test_store.py and test_match.py (hypothesis)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import rand, save_sae


# (command line with {placeholders}, what the error must say). A case whose message starts
# with "flag" is refused by absl's flag parser; every other one by jaxsae itself.
CASES = [
    # extract
    ("extract --model={model} --dataset={text} --sites=model.layers.99.mlp --out={tmp}/e1",
     "model has no module 'model.layers.99.mlp'"),
    ("extract --model={model} --dataset={text} --sites=model.layers.1.mlp:sideways "
     "--out={tmp}/e2", "the suffix must be ':input' or ':output'"),
    ("extract --num_tokens=lots", "flag --num_tokens=lots"),
    ("extract --dtype=int4 --out={tmp}/e3", "unknown dtype 'int4'"),
    ("extract --model=/no/such/model --out={tmp}/e4", "--model=/no/such/model: no such file"),
    ("extract --model={model} --dataset={text} --num_tokens=4096 --ctx_len=64 "
     "--shard_tokens=256 --shard_range=5:2 --out={tmp}/e5", "--shard_range=5:2 is outside 0:16"),
    ("extract --ctx_len=1 --out={tmp}/e6", "must be at least one window"),
    ("extract --model_dtype=float8 --out={tmp}/e7", "--model_dtype=float8: use float32"),
    ("extract --device=quantum --out={tmp}/e8", "--device=quantum is not a torch device"),
    ("extract --batch_size=0 --out={tmp}/e9", "--batch_size=0 must be positive"),
    ("extract --model={model} --dataset={text} --out={file}", "File exists"),
    ("extract --nonsense_flag=1", "flag 'nonsense_flag'|Unknown command line flag"),
    # train
    ("train --store=/no/such/store --out={tmp}/t1", "/no/such/store is not an activation store"),
    ("train --store={store} --out={tmp}/t2 --num_latents=64 --k=64",
     "--k=64 must be between 1 and num_latents-1"),
    ("train --store={store} --out={tmp}/t3 --k=many", "flag --k=many"),
    ("train --store={store} --out={tmp}/t4 --arch=resnet", "--arch=resnet is unknown"),
    ("train --store={store} --out={tmp}/t5 --seeds=0,0", "give one or more distinct seeds"),
    ("train --store={store} --out={tmp}/t6 --seeds=a,b", "--seeds=a,b: every item must be int"),
    ("train --store={store} --out={tmp}/t7 --batch_size=0", "--batch_size=0 must be positive"),
    ("train --store={store} --out={tmp}/t8 --checkpoint_every=0",
     "--checkpoint_every=0 must be positive"),
    ("train --store={store} --out={tmp}/t9 --log_every=0", "--log_every=0 must be positive"),
    ("train --store={store} --out={tmp}/t10 --lr=-1", "--lr=-1.0 must be positive"),
    ("train --store={store} --out={tmp}/t11 --num_latents=64 --k=4 --batch_size=128 --mesh=3",
     "--mesh=3: write it as SEEDSxDATA"),
    ("train --store={store} --out={tmp}/t12 --site=model.layers.7.mlp",
     "site 'model.layers.7.mlp' is not in store"),
    ("train --store={store} --out={tmp}/t13 --batch_size=128 --compute_dtype=float64",
     "--compute_dtype=float64: use float32, bfloat16 or auto"),
    ("train --store={store}", "--store and --out are required"),
    ("train --store={store} --out={file} --batch_size=128", "File exists"),
    ("train --store={store} --out={tmp}/t14 --num_latents=1", "--num_latents=1 must be at least 2"),
    # match
    # Widths may differ (a rectangular match); inputs of another d_in may not.
    ("match {sae_a} {sae_other_d} --out={tmp}/m1", r"only SAEs of the same shape of input \(d_in\)"),
    ("match {sae_a} {sae_b} --out={tmp}/m2 --threshold=1.5", "--threshold=1.5 is not a cosine"),
    ("match {sae_a} {sae_b} --out={tmp}/m3 --threshold=-1.01", "--threshold=-1.01 is not a cosine"),
    ("match {sae_a} {sae_b} --out={tmp}/m4 --threshold=nan", "--threshold=nan is not a cosine"),
    ("match {sae_a} {sae_b} --out={tmp}/m5 --threshold=high", "flag --threshold=high"),
    ("match {sae_a} /no/such/sae --out={tmp}/m6", "/no/such/sae does not exist"),
    ("match {sae_a} --out={tmp}/m7", "only one SAE found"),
    ("match {sae_a} {sae_b} --out={tmp}/m8 --definition=vibes", "--definition='vibes'"),
    ("match {sae_a} {sae_bad_json} --out={tmp}/m9", "cfg.json is not valid JSON"),
    ("match {sae_a} {sae_k_inf} --out={tmp}/m12", "cfg.json has a setting of the wrong type"),
    ("match {sae_a} {sae_b}", "--out is required"),
    ("match {sae_a} {sae_b} --out={tmp}/m10 --block_size=0", "must be positive"),
    ("match {sae_a} {sae_b} --out={tmp}/m11 --freq_tokens=100", "needs an activation store"),
    # report
    ("report /no/such/match", "match.json is missing; run `jaxsae match"),
    ("report {match_bad_json}", "holds an unreadable match result"),
    ("report {match_empty}", "is not a complete `jaxsae match` output"),
    ("report {match_empty} {match_bad_json}", "pass exactly one MATCH_DIR"),
    ("report {match_empty} --examples=some", "flag --examples=some"),
    # demo
    ("demo --num_seeds=two", "flag --num_seeds=two"),
    ("demo --out={tmp}/demo --model=/no/such/model", "--model=/no/such/model: no such file"),
    # the command itself
    ("frobnicate", "unknown command 'frobnicate'"),
]


def _sae(path, n, d=16, cfg_text=None):
  rng = np.random.default_rng(n)
  save_sae(str(path), rand(rng, n, d), rand(rng, n), rand(rng, n, d), rand(rng, d), k=4)
  if cfg_text is not None:
    with open(os.path.join(str(path), "cfg.json"), "w") as f:
      f.write(cfg_text)
  return str(path)


@pytest.fixture(scope="module")
def results(forks, tiny_model_dir, text_dir, train_store, tmp_path_factory):
  """Every case run once, through `jaxsae.cli.main` in a process of its own (the fork server's),
  once for the module: its cases share one worker (the xdist_group below)."""
  tmp = tmp_path_factory.mktemp("bad_input")
  (tmp / "a_file").write_text("not a directory")
  for name, text in (("match_bad_json", "{not json"), ("match_empty", "{}")):
    (tmp / name).mkdir()
    (tmp / name / "match.json").write_text(text)
    (tmp / name / "latents.csv").write_text("a,b\n")
  places = dict(model=tiny_model_dir, text=text_dir, store=train_store, tmp=str(tmp),
                file=str(tmp / "a_file"), sae_a=_sae(tmp / "sae_a", 64),
                sae_b=_sae(tmp / "sae_b", 64), sae_other_d=_sae(tmp / "sae_other_d", 64, d=8),
                sae_bad_json=_sae(tmp / "sae_bad_json", 64, cfg_text='{"k": 4, '),  # cut short
                # Found by test_match.py's generated cfg.json: an OverflowError, now one line.
                sae_k_inf=_sae(tmp / "sae_k_inf", 64, cfg_text='{"k": Infinity}'),
                match_bad_json=str(tmp / "match_bad_json"), match_empty=str(tmp / "match_empty"))
  out = []
  for line, _ in CASES:
    args = line.format(**places).split()
    proc = forks.run(*args)
    out.append({"args": args, "code": proc.returncode, "stdout": proc.stdout,
                "stderr": proc.stderr})
  return out


@pytest.mark.xdist_group("bad input")
@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0].split()[0] + ":" + c[1][:40]
                                                      for c in CASES])
def test_bad_input_is_one_clear_line(results, ledger, i):
  import re
  r, (_, message) = results[i], CASES[i]
  ledger.add("bad_input")
  assert r["code"] in (1, 2), r
  assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
  command = r["args"][0]
  lines = r["stderr"].strip().splitlines()
  if message.startswith("flag"):  # absl: "FATAL Flags parsing error: ...", then a hint
    said = [line for line in lines if "Flags parsing error" in line]
  else:
    said = lines[-1:] if command in ("frobnicate",) else [
        line for line in lines[-1:] if line.startswith(f"jaxsae {command}: error: ")]
  assert said and re.search(message, said[0]), r["stderr"][-3000:]
  ledger.add("clear_error")
