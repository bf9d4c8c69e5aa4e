"""SAEs from where researchers keep them: the Hugging Face Hub cache (hf://) and
dictionary_learning's ae.pt + config.json, beside the sparsify and SAELens directories."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from conftest import rand, random_sae_weights, save_sae

from jaxsae import hub
from jaxsae import saes
from jaxsae.errors import JaxsaeError

D, N, K = 16, 48, 4


def random_weights(rng, n=N, d=D):
  return random_sae_weights(rng, n, d)


def write(path, w, layout="sparsify", k=K, **kw):
  return save_sae(str(path), w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], layout=layout,
                  arch="topk", k=k, **kw)


# ---------------------------------------------------------------------------------------------
# A Hub cache on disk, in huggingface_hub's own layout:
#   models--OWNER--REPO/blobs/<sha256>, refs/<branch or tag> (a commit hash),
#   snapshots/<commit>/<path> -> ../../blobs/<sha256> (relative symlinks, as the hub makes them)


def add_commit(cache, repo_id, src_dir, commit_seed, refs=("main",)):
  """Copies the files under `src_dir` into `cache` as one commit of `repo_id`; returns it."""
  repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  commit = hashlib.sha1(f"{repo_id}{commit_seed}".encode()).hexdigest()
  for here, _, files in os.walk(src_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(here, f), src_dir)
      data = open(os.path.join(here, f), "rb").read()
      blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
      os.makedirs(os.path.dirname(blob), exist_ok=True)
      with open(blob, "wb") as out:
        out.write(data)
      link = os.path.join(repo, "snapshots", commit, rel)
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  for ref in refs:
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", ref), "w") as f:
      f.write(commit)  # the hub writes the hash with no newline
  return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return str(cache)


def release(tmp_path, rng, name, folders, layout="sparsify"):
  """A local release: one SAE folder per name in `folders`; returns (dir, {folder: weights})."""
  root = tmp_path / name
  weights = {}
  for f in folders:
    weights[f] = random_weights(rng)
    write(root / f, weights[f], layout=layout)
  return str(root), weights


def test_parse_specs():
  assert hub.parse("hf://a/b") == hub.Spec("a/b", "", None)
  assert hub.parse("hf://a/b/layers.6.mlp@v1") == hub.Spec("a/b", "layers.6.mlp", "v1")
  assert hub.parse("hf://a/b/x/y@refs/pr/3") == hub.Spec("a/b", "x/y", "refs/pr/3")
  assert str(hub.parse("hf://a/b/x/y@refs/pr/3")) == "hf://a/b/x/y@refs/pr/3"
  for bad in ("hf://a", "hf://a/b@", "hf://a/b/../c"):
    with pytest.raises(JaxsaeError, match="hf://"):
      hub.parse(bad)


def test_hub_subfolder_is_one_sae_and_repo_expands(tmp_path, hub_cache):
  rng = np.random.default_rng(0)
  src, w = release(tmp_path, rng, "rel", ["layers.10.mlp", "layers.2.mlp", "layers.9.mlp"])
  add_commit(hub_cache, "acme/sae-tiny", src, 0)
  (path,) = saes.discover(["hf://acme/sae-tiny/layers.2.mlp"])
  assert path.startswith(hub_cache) and path.endswith("layers.2.mlp")
  loaded = saes.load_all(["hf://acme/sae-tiny"])
  # Natural order (2 < 9 < 10), named by folder, not by the cache's snapshot path.
  assert [s.name for s in loaded] == ["layers.2.mlp", "layers.9.mlp", "layers.10.mlp"]
  for s in loaded:
    np.testing.assert_array_equal(s.W_dec, w[s.name]["W_dec"])
  sae = saes.load_sae("hf://acme/sae-tiny/layers.9.mlp")
  assert sae.name == "hf://acme/sae-tiny/layers.9.mlp"
  np.testing.assert_array_equal(sae.W_enc, w["layers.9.mlp"]["W_enc"])
  assert hub.label(path).startswith("hf://acme/sae-tiny/layers.2.mlp@")


def test_hub_saelens_release_and_root_saes(tmp_path, hub_cache):
  rng = np.random.default_rng(1)
  src, w = release(tmp_path, rng, "lens", ["blocks.3.hook_resid_post"], layout="saelens")
  add_commit(hub_cache, "acme/lens", src, 0)
  a = tmp_path / "roots" / "a"
  b = tmp_path / "roots" / "b"
  wa, wb = random_weights(rng), random_weights(rng)
  write(a, wa)
  write(b, wb, layout="saelens")
  add_commit(hub_cache, "acme/seed-a", str(a), 0)
  add_commit(hub_cache, "acme/seed-b", str(b), 0)
  (lens,) = saes.load_all(["hf://acme/lens", "hf://acme/seed-a"])[:1]
  assert lens.layout == "saelens"
  np.testing.assert_array_equal(lens.W_enc, w["blocks.3.hook_resid_post"]["W_enc"])
  # SAEs at a repo's root are named by the repo.
  assert [s.name for s in saes.load_all(["hf://acme/seed-a", "hf://acme/seed-b"])] == [
      "seed-a", "seed-b"]


def test_hub_revision(tmp_path, hub_cache):
  rng = np.random.default_rng(2)
  old, w_old = release(tmp_path, rng, "old", ["layers.1"])
  new, w_new = release(tmp_path, rng, "new", ["layers.1"])
  c_old = add_commit(hub_cache, "acme/rev", old, 0, refs=("v1",))
  add_commit(hub_cache, "acme/rev", new, 1, refs=("main",))
  get = lambda spec: saes.load_sae(spec).W_dec
  np.testing.assert_array_equal(get("hf://acme/rev/layers.1"), w_new["layers.1"]["W_dec"])
  np.testing.assert_array_equal(get("hf://acme/rev/layers.1@v1"), w_old["layers.1"]["W_dec"])
  np.testing.assert_array_equal(get(f"hf://acme/rev/layers.1@{c_old}"),
                                w_old["layers.1"]["W_dec"])
  # The same folder at two revisions is two SAEs, told apart by their commits.
  names = [s.name for s in saes.load_all(["hf://acme/rev/layers.1",
                                          "hf://acme/rev/layers.1@v1"])]
  assert len(set(names)) == 2 and all(n.startswith("acme/rev/layers.1@") for n in names)
  with pytest.raises(JaxsaeError, match=r"hf://acme/rev/layers.1@v2 is not in the Hugging"):
    saes.discover(["hf://acme/rev/layers.1@v2"])


def test_hub_missing_from_cache_offline(tmp_path, hub_cache):
  rng = np.random.default_rng(3)
  src, _ = release(tmp_path, rng, "rel", ["layers.1"])
  add_commit(hub_cache, "acme/have", src, 0)
  for spec, hint in [
      ("hf://acme/absent/layers.4@v2", "`hf download acme/absent --revision v2 --include "
                                       "'layers.4/*'`"),
      ("hf://acme/absent", "`hf download acme/absent`"),
      # The repo is cached, but not this folder of it.
      ("hf://acme/have/layers.7", "`hf download acme/have --include 'layers.7/*'`"),
  ]:
    with pytest.raises(JaxsaeError) as err:
      saes.load_all([spec, spec + "x"])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{spec} is not in the Hugging Face cache ({hub_cache})")
    assert hint in msg and "unset HF_HUB_OFFLINE" in msg


def test_hub_online_call_and_missing_folder(tmp_path, monkeypatch):
  """Online, only SAE files under the subfolder are asked for, at the revision, into the cache
  of the environment; a folder the repo lacks is one error listing the folders it has."""
  import huggingface_hub
  cache = tmp_path / "cache"
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  snap = tmp_path / "snap"
  (snap / "layers.1").mkdir(parents=True)
  calls = []

  def fake(repo_id, **kw):
    calls.append((repo_id, kw))
    return str(snap)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  assert hub.resolve("hf://acme/r/layers.1@v3") == str(snap / "layers.1")
  (repo_id, kw), = calls
  assert repo_id == "acme/r" and kw["revision"] == "v3" and kw["cache_dir"] == str(cache)
  assert kw["local_files_only"] is False
  assert "layers.1/cfg.json" in kw["allow_patterns"]
  assert "layers.1/*/ae.pt" in kw["allow_patterns"]
  assert all(p.startswith("layers.1/") for p in kw["allow_patterns"])
  with pytest.raises(JaxsaeError, match=r"no SAE files under layers.9/ \(its folders with SAE "
                                        r"files: layers.1\)"):
    hub.resolve("hf://acme/r/layers.9")

  def offline_error(repo_id, **kw):
    raise huggingface_hub.errors.LocalEntryNotFoundError("line one\nline two")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_error)
  with pytest.raises(JaxsaeError, match=r"; fetch it with `hf download acme/r`$"):
    hub.resolve("hf://acme/r")


def test_hub_match_end_to_end(forks, tmp_path, hub_cache):
  """`jaxsae match` on two hf:// SAEs, in a fresh process that only has the cache."""
  rng = np.random.default_rng(4)
  a = random_weights(rng)
  b = random_weights(rng)
  perm = rng.permutation(N)
  shared = perm[:20]
  b["W_enc"][shared] = a["W_enc"][shared] + 0.01 * rand(rng, 20, D)
  b["W_dec"][shared] = a["W_dec"][shared] + 0.01 * rand(rng, 20, D)
  src = tmp_path / "two"
  write(src / "seed-a" / "layers.3", a)
  write(src / "seed-b" / "layers.3", b, layout="saelens")
  add_commit(hub_cache, "acme/pair", str(src), 0)
  out = tmp_path / "out"
  cmd = ["match", "hf://acme/pair/seed-a/layers.3", "hf://acme/pair/seed-b/layers.3",
         f"--out={out}", "--freq_tokens=0"]
  done = forks.run(*cmd, timeout=120)  # with this process's environment: the cache above
  assert done.returncode == 0, done.stderr
  summary = json.loads((out / "match.json").read_text())
  assert summary["pairs"][0]["n_shared"] == 20
  assert [s["layout"] for s in summary["saes"]] == ["sparsify", "saelens"]
  assert [s["name"] for s in summary["saes"]] == ["seed-a/layers.3", "seed-b/layers.3"]
  # The recorded paths are the cache's, so the report can reload the SAEs offline.
  assert all(s["path"].startswith(hub_cache) for s in summary["saes"])
  missing = forks.run(*cmd[:2], "hf://acme/nope/layers.3", f"--out={out}x", timeout=120)
  assert missing.returncode == 1
  assert "error: hf://acme/nope/layers.3 is not in the Hugging Face cache" in missing.stderr


# ---------------------------------------------------------------------------------------------
# dictionary_learning: ae.pt (torch.save of the module's state_dict) + config.json.

torch = pytest.importorskip("torch")


def dl_state(dict_class, rng, n=N, d=D, k=K):
  """A state dict with exactly the keys (and shapes, dtypes) of dictionary_learning's class."""
  t = lambda *shape: torch.from_numpy(rand(rng, *shape))
  if dict_class == "AutoEncoder":
    return {"bias": t(d), "encoder.weight": t(n, d), "encoder.bias": t(n),
            "decoder.weight": t(d, n)}
  if dict_class == "AutoEncoderNew":
    return {"encoder.weight": t(n, d), "encoder.bias": t(n), "decoder.weight": t(d, n),
            "decoder.bias": t(d)}
  if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
    thr = -1.0 if dict_class == "AutoEncoderTopK" else 0.8
    return {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(thr),
            "decoder.weight": t(d, n), "encoder.weight": t(n, d), "encoder.bias": t(n),
            "b_dec": t(d)}
  if dict_class == "MatryoshkaBatchTopKSAE":
    return {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(0.8),
            "group_sizes": torch.tensor([n // 4, n // 4, n // 2]), "W_enc": t(d, n),
            "b_enc": t(n), "W_dec": t(n, d), "b_dec": t(d)}
  if dict_class == "JumpReluAutoEncoder":
    thr = torch.from_numpy(np.abs(rand(rng, n)))
    thr[:3] = torch.tensor([-0.5, 0.0, 1e-4])  # a negative and a zero threshold, as trained
    return {"W_enc": t(d, n), "b_enc": t(n), "W_dec": t(n, d), "b_dec": t(d), "threshold": thr}
  if dict_class == "GatedAutoEncoder":
    return {"decoder_bias": t(d), "encoder.weight": t(n, d), "r_mag": 0.3 * t(n),
            "gate_bias": t(n), "mag_bias": t(n), "decoder.weight": t(d, n)}
  raise ValueError(dict_class)


def dl_encode(dict_class, s, x):
  """dictionary_learning's `encode` of each class, spelled out on the state dict."""
  relu = torch.nn.functional.relu
  lin = lambda x, w, b=None: torch.nn.functional.linear(x, w, b)
  if dict_class == "AutoEncoder":
    return relu(lin(x - s["bias"], s["encoder.weight"], s["encoder.bias"]))
  if dict_class == "AutoEncoderNew":
    return relu(lin(x, s["encoder.weight"], s["encoder.bias"]))
  if dict_class == "AutoEncoderTopK":
    post = relu(lin(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
    top = post.topk(int(s["k"]), sorted=False, dim=-1)
    return torch.zeros_like(post).scatter_(-1, top.indices, top.values)
  if dict_class == "BatchTopKSAE":  # use_threshold=True, its default at inference
    post = relu(lin(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
    return post * (post > s["threshold"])
  if dict_class == "MatryoshkaBatchTopKSAE":  # every group active once loaded
    post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
    return post * (post > s["threshold"])
  if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
    pre = x @ s["W_enc"] + s["b_enc"]
    return relu(pre * (pre > s["threshold"]))
  if dict_class == "GatedAutoEncoder":
    x_enc = lin(x - s["decoder_bias"], s["encoder.weight"])
    gate = (x_enc + s["gate_bias"] > 0).float()
    return gate * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
  raise ValueError(dict_class)


def write_dl(path, state, dict_class, trainer=None, d=D, n=N):
  os.makedirs(path, exist_ok=True)
  torch.save(state, os.path.join(path, "ae.pt"))
  cfg = {"trainer": {"trainer_class": "Trainer", "dict_class": dict_class,
                     "activation_dim": d, "dict_size": n, "layer": 3, "lm_name": "tiny",
                     "submodule_name": "resid_post_layer_3", **(trainer or {})},
         "buffer": {"d_submodule": d, "ctx_len": 128}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


DL_CLASSES = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "AutoEncoderTopK": "topk",
              "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "batchtopk",
              "JumpReluAutoEncoder": "jumprelu",
              "GatedAutoEncoder": "gated"}


@pytest.mark.parametrize("dict_class", list(DL_CLASSES))
def test_dictionary_learning_encodes_as_its_class(tmp_path, dict_class):
  rng = np.random.default_rng(5)
  state = dl_state(dict_class, rng)
  trainer = {"k": K} if "TopK" in dict_class else {}
  path = write_dl(tmp_path / "trainer_0", state, dict_class, trainer)
  sae = saes.load_sae(path)
  assert (sae.layout, sae.arch, sae.name) == ("dictionary_learning", DL_CLASSES[dict_class],
                                              "trainer_0")
  assert sae.W_enc.shape == sae.W_dec.shape == (N, D)
  assert sae.site == "resid_post_layer_3"
  x = 2 * rand(rng, 64, D)
  want = dl_encode(dict_class, state, torch.from_numpy(x)).numpy()
  assert (want > 0).any() and (want == 0).any()
  got = np.asarray(saes.module(sae).encode(x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got > 0, want > 0)
  # The jittable path match and report use gives the same codes.
  graphdef, st = saes.encoder(sae)
  np.testing.assert_allclose(np.asarray(saes.encode(graphdef, st, x, sae.input_scale)), want,
                             rtol=1e-4, atol=1e-4)


def test_dictionary_learning_autoencodernew_recorded_as_autoencoder(tmp_path):
  """StandardTrainerAprilUpdate records dict_class "AutoEncoder" for the AutoEncoderNew it
  trains: the state dict's keys say which it is, and it encodes as AutoEncoderNew."""
  rng = np.random.default_rng(9)
  state = dl_state("AutoEncoderNew", rng)
  sae = saes.load_sae(write_dl(tmp_path / "trainer_0", state, "AutoEncoder"))
  x = 2 * rand(rng, 64, D)
  want = dl_encode("AutoEncoderNew", state, torch.from_numpy(x)).numpy()
  assert not sae.subtract_b_dec and (want > 0).any() and (want == 0).any()
  np.testing.assert_allclose(np.asarray(saes.module(sae).encode(x)), want, rtol=1e-4,
                             atol=1e-4)


def test_dictionary_learning_trainers_dir_and_checkpoint(tmp_path):
  """trainSAE's save_dir holds trainer_{i}/ per trainer: it expands like a run directory; a
  training checkpoint {"ae": state_dict, ...} and bfloat16 weights read as well."""
  rng = np.random.default_rng(6)
  run = tmp_path / "dl_run"
  states = [dl_state("AutoEncoderTopK", rng) for _ in range(3)]
  write_dl(run / "trainer_10", states[2], "AutoEncoderTopK")
  write_dl(run / "trainer_2", {"ae": states[1], "step": 5}, "AutoEncoderTopK")
  write_dl(run / "trainer_1", {k: v.bfloat16() if v.is_floating_point() else v
                               for k, v in states[0].items()}, "AutoEncoderTopK")
  os.makedirs(run / "trainer_1" / "checkpoints")
  torch.save(states[0], run / "trainer_1" / "checkpoints" / "ae_100.pt")
  loaded = saes.load_all([str(run)])
  assert [s.name for s in loaded] == ["trainer_1", "trainer_2", "trainer_10"]
  assert all(s.k == K for s in loaded)
  np.testing.assert_array_equal(loaded[2].W_dec, states[2]["decoder.weight"].numpy().T)
  np.testing.assert_allclose(loaded[0].W_enc, states[0]["encoder.weight"].numpy(), rtol=1e-2)


def test_dictionary_learning_from_hub(tmp_path, hub_cache):
  rng = np.random.default_rng(7)
  src = tmp_path / "bench"
  for layer in (3, 4):
    write_dl(src / f"resid_post_layer_{layer}" / "trainer_0", dl_state("BatchTopKSAE", rng),
             "BatchTopKSAE")
  add_commit(hub_cache, "acme/saebench", str(src), 0)
  loaded = saes.load_all(["hf://acme/saebench"])
  assert [s.name for s in loaded] == ["resid_post_layer_3/trainer_0",
                                      "resid_post_layer_4/trainer_0"]
  assert {s.arch for s in loaded} == {"batchtopk"}


def test_dictionary_learning_errors(tmp_path):
  rng = np.random.default_rng(8)
  good = dl_state("AutoEncoderTopK", rng)
  cases = []

  def case(name, state, dict_class="AutoEncoderTopK", trainer=None, match=""):
    cases.append((write_dl(tmp_path / name, state, dict_class, trainer), match))

  case("unknown", good, "MatryoshkaCrossCoder", match="dict_class 'MatryoshkaCrossCoder' is not")
  case("missing", {k: v for k, v in good.items() if k != "encoder.bias"},
       match=r"ae.pt lacks encoder.bias \(has")
  case("k_mismatch", good, trainer={"k": K + 1}, match="k=4 but config.json k=5")
  case("size_mismatch", good, trainer={"dict_size": N + 1}, match="dict_size=49")
  case("not_dict", [good["b_dec"]], match="not a state dict of tensors")
  garbage = write_dl(tmp_path / "garbage", good, "AutoEncoderTopK")
  with open(os.path.join(garbage, "ae.pt"), "wb") as f:
    f.write(b"not a torch file")
  cases.append((garbage, "cannot read"))
  no_trainer = write_dl(tmp_path / "no_trainer", good, "AutoEncoderTopK")
  with open(os.path.join(no_trainer, "config.json"), "w") as f:
    json.dump({"dict_class": "AutoEncoderTopK"}, f)
  cases.append((no_trainer, r'no "trainer"'))
  no_cfg = write_dl(tmp_path / "no_cfg", good, "AutoEncoderTopK")
  os.remove(os.path.join(no_cfg, "config.json"))
  cases.append((no_cfg, "has ae.pt but no config.json"))
  nan = {**good, "encoder.weight": good["encoder.weight"].clone()}
  nan["encoder.weight"][0, 0] = float("nan")
  case("nan", nan, match="NaN")
  for path, match in cases:
    with pytest.raises(JaxsaeError, match=match) as err:
      saes.load_sae(path)
    assert "\n" not in str(err.value), str(err.value)


def test_local_release_dir_expands(tmp_path):
  """A folder of SAE folders that is not a run (a downloaded release) expands to each."""
  rng = np.random.default_rng(9)
  src, _ = release(tmp_path, rng, "rel", ["layers.1", "layers.0"])
  os.makedirs(os.path.join(src, ".cache", "huggingface"))
  assert [os.path.basename(p) for p in saes.discover([src])] == ["layers.0", "layers.1"]
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  with pytest.raises(JaxsaeError, match="neither an SAE directory"):
    saes.discover([str(empty)])
