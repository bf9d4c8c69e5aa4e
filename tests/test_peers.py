"""SAEs in and out of jaxsae mean the same thing in SAELens and sparsify, checked against the
libraries themselves (the test command installs sae-lens and eai-sparsify): their own loaders
and encoders on jaxsae's exports, and jaxsae's readers on files saved by their own save
methods. Codes and reconstructions are compared on the same rows, never against a rewrite."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from conftest import rand, random_sae_weights, train_config
from jaxsae import formats
from jaxsae import saes, store_writer
from jaxsae.errors import JaxsaeError
from jaxsae.sae import ARCHITECTURES, READERS, SaeConfig

N, D, K = 48, 16, 5
ARCHS = list(ARCHITECTURES)
# One worker imports SAELens and sparsify for all of them (5.8 and 3.8 CPU-s; with a module's
# tests spread over both workers, both paid).
pytestmark = pytest.mark.xdist_group("peers")


@pytest.fixture(scope="module")
def lens():
  import sae_lens
  return sae_lens


@pytest.fixture(scope="module")
def sparsify():
  import sparsify
  return sparsify


def rows(seed=0, n=96):
  """Rows off the origin and of uneven norms, as a residual stream's are."""
  rng = np.random.default_rng(seed)
  return (3 * rand(rng, n, D) + rand(rng, D)) * rng.uniform(0.5, 2, (n, 1)).astype(np.float32)


def trainer_params(arch, seed=0):
  """Random weights of a jaxsae `arch` SAE as the trainer exports them (W_enc [d_in, n])."""
  rng = np.random.default_rng(seed)
  w = random_sae_weights(rng, N, D)
  p = {"W_enc": w["W_enc"].T.copy() / 2, "b_enc": w["b_enc"], "W_dec": w["W_dec"],
       "b_dec": w["b_dec"]}
  if READERS[ARCHITECTURES[arch].family].name == "jumprelu":
    p["threshold"] = np.abs(rand(rng, N)) + 0.5
  if ARCHITECTURES[arch].family == "batchtopk":
    p["threshold"] = np.float32(1.0)
  if arch == "gated":
    p["r_mag"], p["b_mag"] = 0.3 * rand(rng, N), 0.1 * rand(rng, N)
  return p


def trainer_module(arch, params):
  """The trainer's module of `arch` holding `params` (Matryoshka encodes as BatchTopK)."""
  cls = ARCHITECTURES[arch] if arch != "matryoshka" else READERS["batchtopk"]
  return cls.from_weights(params, SaeConfig(k=K))


def jaxsae_codes(arch, params, x, scale):
  """(codes, reconstruction in the rows' units) as the trainer's module computes them."""
  m = trainer_module(arch, params)
  z = np.asarray(m.encode(x * scale))
  return z, np.asarray(m.decode(z)) / scale


def export_cfg(arch, scale, params):
  """What `jaxsae.train.export` records of a member, in brief."""
  return {"arch": arch, "k": K, "seed": 0, "input_scale": scale, "site": "model.layers.3.mlp",
          "apply_b_dec_to_input": trainer_module(arch, params).subtracts_b_dec}


def close(a, b, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()), err_msg=what)


def sparsify_encode(coder, x):
  """(dense codes, reconstruction) of rows x by sparsify's own encode and decode."""
  with torch.no_grad():
    acts, idx, _ = coder.encode(torch.from_numpy(x))
    return (torch.zeros(len(x), coder.num_latents).scatter(-1, idx, acts).numpy(),
            coder.decode(acts, idx).numpy())


def lens_dense(t):
  return t.detach().to_dense().numpy() if t.is_sparse else t.detach().numpy()


# --- jaxsae's exports, loaded by the peers --------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 2.5], ids=["raw", "normalize"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_every_export_with_jaxsae_codes(tmp_path, lens, arch, scale):
  """Every architecture, with the input scale of --normalize folded in: SAELens's own
  load_from_disk and encode/decode reproduce jaxsae's codes and reconstructions, and jaxsae
  reads the file back to the same codes."""
  params, x = trainer_params(arch), rows()
  formats.saelens.write(str(tmp_path / "sae"), params, export_cfg(arch, scale, params))
  z, x_hat = jaxsae_codes(arch, params, x, scale)
  assert (z > 0).any(1).mean() > 0.5 and (z == 0).any(1).all()  # a test that can fail
  peer = lens.SAE.load_from_disk(str(tmp_path / "sae"))
  assert peer.cfg.architecture() == ARCHITECTURES[arch].saelens_architecture
  assert peer.cfg.metadata.hook_name == "model.layers.3.mlp"
  codes = peer.encode(torch.from_numpy(x))
  close(lens_dense(codes), z, "codes")
  close(peer.decode(codes).detach().numpy(), x_hat, "reconstructions")
  back, codes_back = jaxsae_reads(tmp_path / "sae", x)
  assert back.site == "model.layers.3.mlp" and back.input_scale == 1.0
  close(codes_back, z, "read back")


@pytest.mark.parametrize("scale", [1.0, 2.5], ids=["raw", "normalize"])
def test_sparsify_loads_topk_export_with_jaxsae_codes(tmp_path, sparsify, scale):
  """A TopK export (with --normalize's scale folded in) encodes the same in sparsify's own
  SparseCoder, loaded strictly by its load_from_disk."""
  params, x = trainer_params("topk"), rows()
  formats.sparsify.write(str(tmp_path / "sae"), params, export_cfg("topk", scale, params))
  z, x_hat = jaxsae_codes("topk", params, x, scale)
  codes, recon = sparsify_encode(sparsify.SparseCoder.load_from_disk(str(tmp_path / "sae")), x)
  close(codes, z, "codes")
  close(recon, x_hat, "reconstructions")
  mode = os.stat(tmp_path / "sae" / formats.sparsify.WEIGHTS_FILE).st_mode
  assert mode & stat.S_IROTH and mode & stat.S_IRGRP  # for others to read, not owner-only


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "topk"])
def test_sparsify_layout_refuses_what_sparsify_cannot_encode(tmp_path, arch):
  from jaxsae import train
  with pytest.raises(ValueError, match="sparsify cannot encode"):
    params = trainer_params(arch)
    formats.sparsify.write(str(tmp_path / "sae"), params, export_cfg(arch, 1.0, params))
  store = tmp_path / "store"
  store_writer.write_store(str(store), rows(n=256), rows_per_shard=128)
  with pytest.raises(JaxsaeError, match="--layouts=saelens"):
    train.run(train_config(store, tmp_path / "run", arch=arch, layouts=("sparsify",)))


def test_trainer_writes_both_layouts_the_peers_read_alike(tmp_path, lens, sparsify):
  """`jaxsae train --layouts=sparsify,saelens` with --normalize: RUN/seed{N} in sparsify's
  layout and RUN/saelens/seed{N} in SAELens's encode the store's rows as jaxsae's reader of
  either does; an architecture sparsify cannot encode goes to SAELens's layout by default."""
  from jaxsae import store as store_lib, train
  store = tmp_path / "store"
  store_writer.write_store(str(store), rows(n=1024), rows_per_shard=256)
  run = tmp_path / "run"
  train.run(train_config(store, run, num_latents=N, seeds=(0,), normalize=True,
                         layouts=("sparsify", "saelens")))
  x = store_lib.Store(str(store)).batch(0, 128)
  ours, z = jaxsae_reads(run / "seed0", x)
  assert ours.layout == "sparsify" and ours.cfg["jaxsae"]["input_scale_folded"] != 1.0
  assert saes.load_sae(str(run / "saelens" / "seed0")).layout == "saelens"
  close(sparsify_encode(sparsify.SparseCoder.load_from_disk(str(run / "seed0")), x)[0], z,
        "sparsify")
  with torch.no_grad():
    close(lens_dense(lens.SAE.load_from_disk(str(run / "saelens" / "seed0")).encode(
        torch.from_numpy(x))), z, "SAELens")
  relu = tmp_path / "relu"
  train.run(train_config(store, relu, arch="jumprelu", num_latents=N, seeds=(0,),
                         num_tokens=128 * 4))
  assert formats.layout_of(str(relu / "seed0")) == "saelens"
  assert not os.path.exists(relu / "saelens")


# --- the peers' own files, read by jaxsae ----------------------------------------------------


def randomized(module, seed=0, positive=("threshold",)):
  """`module` (a torch SAE) with every parameter drawn at random, thresholds positive."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=g))
      if name in positive:
        p.abs_().add_(0.2)
  return module


def jaxsae_reads(path, x):
  sae = saes.load_sae(str(path))
  return sae, np.asarray(saes.encode(*saes.encoder(sae), x, sae.input_scale))


def lens_cases(lens):
  """(name, SAELens SAE, how its codes are made for reading) for every variant it saves."""
  L = lens
  cfg = dict(d_in=D, d_sae=N)
  return {
      "standard": L.StandardSAE(L.StandardSAEConfig(**cfg)),
      "standard_no_b_dec": L.StandardSAE(L.StandardSAEConfig(**cfg, apply_b_dec_to_input=False)),
      "topk": L.TopKSAE(L.TopKSAEConfig(**cfg, k=K)),
      "topk_rescaled": L.TopKSAE(L.TopKSAEConfig(**cfg, k=K, rescale_acts_by_decoder_norm=True)),
      # What SAELens's trainer saves for every TopK checkpoint: rescaled, decoder unfolded.
      "topk_training": L.TopKTrainingSAE(L.TopKTrainingSAEConfig(**cfg, k=K)),
      "topk_layer_norm": L.TopKSAE(L.TopKSAEConfig(**cfg, k=K, normalize_activations="layer_norm")),
      "standard_constant_norm": L.StandardSAE(L.StandardSAEConfig(
          **cfg, normalize_activations="constant_norm_rescale")),
      "jumprelu": L.JumpReLUSAE(L.JumpReLUSAEConfig(**cfg)),
      "gated": L.GatedSAE(L.GatedSAEConfig(**cfg)),
  }


@pytest.mark.parametrize("case", [
    "standard", "standard_no_b_dec", "topk", "topk_rescaled", "topk_training", "topk_layer_norm",
    "standard_constant_norm", "jumprelu", "gated"])
def test_jaxsae_reads_saelens_own_saves(tmp_path, lens, case):
  """Each SAELens variant, saved by its own save_model and loaded back by its own
  load_from_disk: jaxsae's codes (and, without a per-row normalisation, reconstructions) equal
  SAELens's."""
  peer = randomized(lens_cases(lens)[case])
  peer.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
  peer.save_model(str(tmp_path / "sae"))
  x = rows()
  cls = lens.TrainingSAE if case.endswith("training") else lens.SAE
  peer = cls.load_from_disk(str(tmp_path / "sae"))
  with torch.no_grad():
    want = lens_dense(peer.encode(torch.from_numpy(x)))
    recon = peer.decode(peer.encode(torch.from_numpy(x))).numpy()
  assert (want > 0).any() and (want == 0).any()
  sae, z = jaxsae_reads(tmp_path / "sae", x)
  assert sae.site == "blocks.3.hook_resid_post"
  close(z, want, "codes")
  if sae.input_norm == "none":
    m = saes.module(sae)
    close(np.asarray(m.decode(z)) / sae.input_scale, recon, "reconstructions")


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_jaxsae_reads_saelens_batchtopk_checkpoints_as_saelens_infers(tmp_path, lens, arch):
  """A BatchTopK (or Matryoshka) training checkpoint holds topk_threshold and a decoder not
  folded; jaxsae encodes it as SAELens's own save_inference_model does (JumpReLU)."""
  L = lens
  kw = dict(d_in=D, d_sae=N, k=K)
  if arch == "batchtopk":
    peer = L.BatchTopKTrainingSAE(L.BatchTopKTrainingSAEConfig(**kw))
  else:
    peer = L.MatryoshkaBatchTopKTrainingSAE(L.MatryoshkaBatchTopKTrainingSAEConfig(
        **kw, matryoshka_widths=[16, N]))
  randomized(peer)
  peer.topk_threshold = torch.tensor(0.4, dtype=torch.double)
  peer.save_model(str(tmp_path / "ckpt"))
  peer.save_inference_model(str(tmp_path / "inference"))
  x = rows()
  infer = L.SAE.load_from_disk(str(tmp_path / "inference"))
  with torch.no_grad():
    want = lens_dense(infer.encode(torch.from_numpy(x)))
  assert (want > 0).any() and (want == 0).any()
  for path in ("ckpt", "inference"):
    close(jaxsae_reads(tmp_path / path, x)[1], want, path)


def test_jaxsae_applies_a_checkpoints_activation_scaler(tmp_path, lens):
  """expected_average_only_in before SAELens's trainer folds it: the scaling factor beside the
  checkpoint (its ActivationScaler's own file) is applied, as folding it in SAELens does; with
  none, the file is refused in one line."""
  from sae_lens.training.activation_scaler import ActivationScaler
  L = lens
  peer = randomized(L.TopKTrainingSAE(L.TopKTrainingSAEConfig(
      d_in=D, d_sae=N, k=K, normalize_activations="expected_average_only_in")))
  peer.save_model(str(tmp_path / "ckpt"))
  ActivationScaler(scaling_factor=1.7).save(str(tmp_path / "ckpt" / "activation_scaler.json"))
  peer.fold_activation_norm_scaling_factor(1.7)
  x = rows()
  with torch.no_grad():
    want = lens_dense(peer.encode(torch.from_numpy(x)))
  close(jaxsae_reads(tmp_path / "ckpt", x)[1], want, "codes")
  os.remove(tmp_path / "ckpt" / "activation_scaler.json")
  one_line_refusal(tmp_path / "ckpt", "expected_average_only_in")


def one_line_refusal(path, field):
  with pytest.raises(JaxsaeError) as e:
    saes.load_sae(str(path))
  msg = str(e.value)
  assert field in msg and "\n" not in msg, msg
  return msg


def test_jaxsae_refuses_saelens_what_it_cannot_encode(tmp_path, lens):
  L = lens
  whitened = randomized(L.TopKSAE(L.TopKSAEConfig(d_in=D, d_sae=N, k=K,
                                                  normalize_activations="covariance_whitening")))
  whitened.save_model(str(tmp_path / "white"))
  one_line_refusal(tmp_path / "white", "covariance_whitening")
  randomized(L.AbsTopKSAE(L.AbsTopKSAEConfig(d_in=D, d_sae=N, k=K))).save_model(
      str(tmp_path / "abs"))
  one_line_refusal(tmp_path / "abs", "abstopk")
  # A tensor no rule of jaxsae's reads is refused by name, not dropped.
  from safetensors.numpy import load_file, save_file
  randomized(L.StandardSAE(L.StandardSAEConfig(d_in=D, d_sae=N))).save_model(
      str(tmp_path / "extra"))
  t = load_file(str(tmp_path / "extra" / formats.saelens.WEIGHTS_FILE))
  save_file({**t, "W_skip": np.eye(D, dtype=np.float32)},
            str(tmp_path / "extra" / formats.saelens.WEIGHTS_FILE))
  one_line_refusal(tmp_path / "extra", "W_skip")


def sparsify_saved(sparsify, path, seed=0, k=K, **cfg):
  coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=k, **cfg))
  randomized(coder, seed)
  coder.save_to_disk(str(path))
  return sparsify.SparseCoder.load_from_disk(str(path))


@pytest.mark.parametrize("kind", ["topk", "transcoder", "groupmax"])
def test_jaxsae_reads_sparsify_own_saves(tmp_path, sparsify, kind):
  """sparsify's SparseCoder saved by save_to_disk: codes equal sparsify's encode, for TopK,
  for a transcoder (whose encoder reads its input without subtracting b_dec) and for groupmax
  (one latent per each of k groups)."""
  transcode = kind == "transcoder"
  peer = sparsify_saved(sparsify, tmp_path / "sae", transcode=transcode,
                        **({"activation": "groupmax", "k": 6} if kind == "groupmax" else {}))
  if kind == "groupmax":
    assert saes.load_sae(str(tmp_path / "sae")).arch == "groupmax"
  x = rows()
  want, recon = sparsify_encode(peer, x)
  sae, z = jaxsae_reads(tmp_path / "sae", x)
  assert sae.subtract_b_dec == (not transcode)
  close(z, want, "codes")
  close(np.asarray(saes.module(sae).decode(z)), recon, "reconstructions")


def test_jaxsae_refuses_sparsify_what_it_cannot_encode(tmp_path, sparsify):
  coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=7,
                                                               activation="groupmax"))
  coder.save_to_disk(str(tmp_path / "groupmax"))  # 48 latents in 7 groups: sparsify fails too
  one_line_refusal(tmp_path / "groupmax", "groupmax")
  sparsify_saved(sparsify, tmp_path / "skip", skip_connection=True)
  one_line_refusal(tmp_path / "skip", "skip_connection")
  # The tensor alone, with the cfg saying nothing of it: refused, not an AttributeError.
  cfg_path = tmp_path / "skip" / "cfg.json"
  cfg = json.load(open(cfg_path))
  json.dump({**cfg, "skip_connection": False}, open(cfg_path, "w"))
  one_line_refusal(tmp_path / "skip", "skip")


def test_an_sae_named_by_its_family_exports(tmp_path, lens):
  """What a consensus of other libraries' SAEs carries is a family ("relu", "groupmax"), not a
  jaxsae architecture: it exports where its library encodes it, and only there."""
  params, x = trainer_params("relu_l1"), rows()
  formats.saelens.write(str(tmp_path / "sae"), params, {**export_cfg("relu_l1", 1.0, params),
                                                  "arch": "relu"})
  z, _ = jaxsae_codes("relu_l1", params, x, 1.0)
  close(lens_dense(lens.SAE.load_from_disk(str(tmp_path / "sae")).encode(torch.from_numpy(x))),
        z, "codes")
  assert not formats.writes("sparsify", "relu") and formats.writes("sparsify", "groupmax")
  assert not formats.writes("saelens", "groupmax")
  with pytest.raises(ValueError, match="SAELens has no class"):
    formats.saelens.write(str(tmp_path / "g"), params, {"arch": "groupmax", "k": K})
