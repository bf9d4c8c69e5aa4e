"""The paper_saes study on a Hub cache planted in the released repositories' layout: it runs end to
end offline, and its numbers are `jaxsae match`'s on the same SAEs."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import rand

from experiments import paper_saes as ps
from jaxsae import match

D = 16
# Small stand-ins for each size, so that the widths still differ.
WIDTHS = {"32": 32, "768": 48, "4k": 64, "32k": 64, "131k": 96}
SIZE_SHARED = {"32": 0.8, "768": 0.75, "4k": 0.6, "131k": 0.3}
K_SHARED = {64: 0.4, 128: 0.3, 256: 0.2}
LAYER_SHARED = {"layers.0.mlp": 0.1, "layers.11.mlp": 0.4}  # layers.6.mlp: the size's
SEED1_REPO = "EleutherAI/sae-pythia-160m-32k"
# The census: seed 1's latents 0..15 are planted in all eight others, 48..63 in none, and each of
# 16..47 in each other seed with probability 1/2.
IN_ALL, ALONE_FROM = 16, 48


def add_commit(cache, repo_id, src_dir):
  """The files under `src_dir` as the one commit of `repo_id` on main, in huggingface_hub's
  cache layout: blobs/<sha256>, snapshots/<commit>/<path> linked to them, refs/main."""
  repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  for here, _, names in os.walk(src_dir):
    for name in names:
      data = open(os.path.join(here, name), "rb").read()
      blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
      os.makedirs(os.path.dirname(blob), exist_ok=True)
      with open(blob, "wb") as f:
        f.write(data)
      link = os.path.join(repo, "snapshots", commit, os.path.relpath(os.path.join(here, name),
                                                                     src_dir))
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(commit)  # the hub writes the hash with no newline


def write_sparsify(path, w, k=32):
  """An SAE folder as sparsify writes it: its own cfg.json fields, no jaxsae block."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  n, d = w["W_dec"].shape
  save_file({"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
             "b_dec": w["b_dec"]}, os.path.join(path, "sae.safetensors"))
  cfg = {"expansion_factor": max(n // d, 1), "normalize_decoder": True, "num_latents": 0,
         "k": k, "multi_topk": False, "skip_connection": False, "d_in": d}
  with open(os.path.join(path, "cfg.json"), "w") as f:
    json.dump(cfg, f)


def random_sae(rng, n):
  return {"W_enc": rand(rng, n, D), "b_enc": 0.1 * rand(rng, n), "W_dec": rand(rng, n, D),
          "b_dec": 0.1 * rand(rng, D)}


def twin(rng, a, latents):
  """A random SAE holding `latents` of `a` (rows permuted, a little noise): a's shared ones."""
  n = len(a["W_dec"])
  b = random_sae(rng, n)
  to = rng.permutation(n)[:len(latents)]
  for key in ("W_enc", "W_dec"):
    b[key][to] = a[key][latents] + 0.02 * rand(rng, len(latents), D)
  return b


def some(rng, n, fraction):
  return rng.permutation(n)[:int(round(fraction * n))]


def plant(root, seed1_root, rng) -> dict:
  """The two repositories' files under `root` and `seed1_root`; returns the census's plan."""
  def pair(run_a, run_b, n, fraction, k=32, hooks=("layers.6.mlp",), a_root=root):
    for hook in hooks:
      a = random_sae(rng, n)
      frac = LAYER_SHARED.get(hook, fraction)
      write_sparsify(os.path.join(a_root, run_a, hook), a, k)
      write_sparsify(os.path.join(root, run_b, hook), twin(rng, a, some(rng, n, frac)), k)

  layers = ("layers.0.mlp", "layers.6.mlp", "layers.11.mlp")
  for size, fraction in SIZE_SHARED.items():
    pair(ps.run_name(size), ps.run_name(size, seed=2), WIDTHS[size], fraction,
         hooks=layers if size in ps.LAYER_SIZES else ("layers.6.mlp",))
  for k, fraction in K_SHARED.items():
    pair(ps.run_name(k=k), ps.run_name(k=k, seed=2), WIDTHS["32k"], fraction, k=k)
  # 32K, k = 32: seed 1 is its own repository; seed 2 is also the layer figure's.
  pair("", ps.run_name(seed=2), WIDTHS["32k"], 0.5, hooks=("layers.0.mlp", "layers.11.mlp"),
       a_root=seed1_root)
  n = WIDTHS["32k"]
  base = random_sae(rng, n)
  write_sparsify(os.path.join(seed1_root, "layers.6.mlp"), base)
  found = np.ones(n, int)
  for s in range(2, ps.CENSUS_SEEDS + 1):
    middle = np.arange(IN_ALL, ALONE_FROM)
    latents = np.concatenate([np.arange(IN_ALL), middle[rng.random(len(middle)) < 0.5]])
    found[latents] += 1
    write_sparsify(os.path.join(root, ps.run_name(seed=s), "layers.6.mlp"),
                   twin(rng, base, latents))
  return {"in_all": int((found == ps.CENSUS_SEEDS).sum()), "alone": int((found == 1).sum())}


@pytest.fixture(scope="module")
def planted(forks, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("paper_saes")
  cache = str(tmp / "hub")
  rng = np.random.default_rng(0)
  plan = plant(str(tmp / "src"), str(tmp / "seed1"), rng)
  add_commit(cache, ps.REPO, str(tmp / "src"))
  add_commit(cache, SEED1_REPO, str(tmp / "seed1"))
  out = tmp / "out"
  env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
  # `python -m experiments.run ...` in a process of its own, forked (tests/forks.py).
  done = forks.run("--study=paper_saes", f"--out={out}", f"--paper_repo={ps.REPO}",
                   "--paper_revision=main", module="experiments.run", env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out / "paper_saes" / "results.json") as f:
    res = json.load(f)
  return {"res": res, "plan": plan, "cache": cache, "out": out, "stdout": done.stdout}


@pytest.fixture
def offline_cache(planted, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", planted["cache"])
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def direct(inputs, out, strict=True) -> dict:
  """`jaxsae match` itself, with the rule the study asks for."""
  return match.run(match.MatchConfig(inputs=tuple(inputs), out=str(out), threshold=0.7,
                                     strict=strict, definition="both_above", freq_tokens=0))


def spec(repo, run, hook="layers.6.mlp"):
  return f"hf://{repo}/{run + '/' if run else ''}{hook}@main"


@pytest.mark.slow
def test_study_runs_on_the_planted_cache(planted):
  res = planted["res"]
  assert res["missing"] == []
  assert res["rule"] == "both_above, cosines > 0.7"
  assert os.path.isfile(planted["out"] / "paper_saes" / "paper_saes.png")
  assert [r["n_latents"] for r in res["size"]] == [WIDTHS[s] for s in ps.SIZES]
  assert [r["k"] for r in res["k"]] == list(ps.KS)
  # Planted rows are found (cosines ~0.999); chance partners of random rows stay below 0.7.
  for r, size in zip(res["size"], ps.SIZES):
    planted_n = round(SIZE_SHARED.get(size, 0.5) * WIDTHS[size]) if size != "32k" else None
    if planted_n is not None:
      assert r["n_shared"] == planted_n
  assert res["k"][0]["match"] == res["size"][3]["match"]  # one 32K, k = 32 match serves both
  assert {(r["nominal_latents"], r["layer"]) for r in res["layers"]} == {
      (ps.SIZES[s], layer) for s in ps.LAYER_SIZES for layer in (0, 6, 11)}
  assert res["census"]["in_all"] == planted["plan"]["in_all"]
  assert res["census"]["alone"] == planted["plan"]["alone"]
  assert "census in all" in planted["stdout"]


def test_numbers_equal_jaxsae_match(planted, offline_cache, tmp_path):
  res = planted["res"]
  for r, size in zip(res["size"], ps.SIZES):
    a = spec(SEED1_REPO, "") if size == "32k" else spec(ps.REPO, ps.run_name(size))
    got = direct([a, spec(ps.REPO, ps.run_name(size, seed=2))], tmp_path / size)["pairs"][0]
    assert r["n_shared"] == got["rules"]["both_above"]["n_shared"]
    assert r["decoder_mcc"] == got["decoder_mcc"]
    assert r["bijections_agree"] == got["fraction_agree"]
  layer0 = next(r for r in res["layers"] if r["nominal_latents"] == 768 and r["layer"] == 0)
  got = direct([spec(ps.REPO, ps.run_name("768"), "layers.0.mlp"),
                spec(ps.REPO, ps.run_name("768", seed=2), "layers.0.mlp")], tmp_path / "l0")
  assert layer0["n_shared"] == got["pairs"][0]["rules"]["both_above"]["n_shared"]
  # The census from eight pairs is the one `jaxsae match` finds matching all nine at once.
  nine = [spec(SEED1_REPO, "")] + [spec(ps.REPO, ps.run_name(seed=s))
                                   for s in range(2, ps.CENSUS_SEEDS + 1)]
  got = direct(nine, tmp_path / "nine")["seeds"]["found_in_counts"]
  assert res["census"]["found_in_counts"] == got


def test_strict_rule_only_where_a_cosine_is_the_threshold():
  """> and >= differ only at a cosine equal to the threshold (in float32, as the cosines)."""
  cos = np.array([0.7, 0.71, 0.69, np.nan], np.float32)
  part = np.arange(4)
  ge = match.rule_masks(part, cos, part, cos, cos, cos, 0.7)
  gt = match.rule_masks(part, cos, part, cos, cos, cos, 0.7, strict=True)
  for rule in match.RULES:
    assert ge[rule].tolist() == [True, True, False, False]
    assert gt[rule].tolist() == [False, True, False, False]
  assert match.MatchConfig().strict is False  # jaxsae's own rule stays >=


def test_runs_are_named_as_the_release():
  src = ps.Source(revision="v1")
  assert ps.seed_of(src, "4k", seed=2).spec("layers.6.mlp") == (
      "hf://EleutherAI/sae_overlap/k32-sae-mlp-4k-seed2/layers.6.mlp@v1")
  assert ps.seed_of(src, k=128).spec("layers.6.mlp") == (
      "hf://EleutherAI/sae_overlap/k128-sae-mlp-32k/layers.6.mlp@v1")
  # Seed 1 of the 32K run is its own repository, at its own revision.
  assert ps.seed_of(src).spec("layers.6.mlp") == (
      "hf://EleutherAI/sae-pythia-160m-32k/layers.6.mlp")
  counts = ps.census_counts(np.array([[1, 1, 0], [1, 0, 0]], bool))
  assert (counts["in_all"], counts["alone"], counts["found_in_counts"]) == (
      1, 1, {"1": 1, "2": 1, "3": 1})
