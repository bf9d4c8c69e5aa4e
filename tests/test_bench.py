"""A tiny smoke run of each benchmark: they are commands, so CI only checks that they run.

Each runs as `python bench/SCRIPT ARGS` would, in a process of its own forked from the worker's
fork server (tests/forks.py, which imports jax, torch and the peers once) rather than in an
interpreter of its own that would import them again (seconds each: most of a smoke's time).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from jaxsae import cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the benchmarks import, imported by the server before it forks one that needs them.
JAX = ("jax", "flax.nnx", "optax", "jaxsae.train", "jaxsae.store", "jaxsae.store_writer",
       "jaxsae.cpu_kernels")
TORCH = ("torch", "transformers", "jaxsae.extract", "transformers.models.auto.modeling_auto",
         "transformers.models.auto.tokenization_auto", "transformers.models.gpt2.modeling_gpt2")
PEERS = ("sparsify", "sae_lens", "transformers.optimization")


def _run(forks, script, *args, warm=JAX):
  out = forks.run(*args, script=os.path.join(ROOT, "bench", script), warm=warm, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


@pytest.fixture(scope="module")
def train_rows(forks, tmp_path_factory):
  """One bench_train smoke for the two tests below (one worker runs both: their xdist_group):
  jaxsae, sparsify and (installed here) SAELens on the same batches, as `--sides` runs them in
  one command."""
  out = tmp_path_factory.mktemp("bench_train") / "r.json"
  sides = ["jaxsae", "sparsify"] + (["saelens"] if importlib.util.find_spec("sae_lens") else [])
  _run(forks, "bench_train.py", "--d_in=32", "--num_latents=256", "--k=8", "--batch_size=256",
       "--seeds=1,2", "--steps=3", "--warmup=1", f"--sides={','.join(sides)}", f"--out={out}",
       warm=JAX + TORCH + PEERS)
  return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("bench train")
def test_bench_train_smoke(train_rows):
  rows = train_rows
  assert [r["seeds"] for r in rows] == [1, 2]
  for r in rows:
    assert r["jaxsae_tok_s_per_seed"] > 0 and r["sparsify_tok_s_per_seed"] > 0
    assert 0 < r["jaxsae_fvu"] < 1.5 and 0 < r["sparsify_fvu"] < 1.5
    # The floor is its two parts, each timed alone; the row gives the step over it.
    assert 0 < r["jaxsae_floor_s"] == r["jaxsae_floor_product_s"] + r["jaxsae_floor_state_s"]
    assert r["jaxsae_over_floor"] == r["jaxsae_step_s"] / r["jaxsae_floor_s"]


@pytest.mark.slow
@pytest.mark.xdist_group("bench train")
def test_bench_train_saelens_smoke(train_rows):
  if importlib.util.find_spec("sae_lens") is None:  # (its import here would cost seconds)
    pytest.skip("sae_lens is a bench-only peer: pip install -e .[bench]")
  one, two = train_rows
  assert one["saelens_tok_s_per_seed"] > 0 and 0 < one["saelens_fvu"] < 1.5
  assert one["speedup_vs_saelens"] > 0
  # Its trainer holds one SAE: at S > 1 the row says it was skipped instead of timing it.
  assert "skipped" in two["saelens"] and "saelens_tok_s_per_seed" not in two
  assert two["jaxsae_tok_s_per_seed"] > 0


def test_bench_train_missing_peer_says_how_to_install(forks, tmp_path):
  # sys.modules[name] = None makes the peer unimportable, as on a machine without the extra
  # (whether or not the fork server imported it); the run stops in one line that names the
  # fix, before any side has spent time.
  script = tmp_path / "without_saelens.py"
  script.write_text("import runpy, sys; sys.modules['sae_lens'] = None; "
                    "sys.argv = ['bench_train.py', '--sides=jaxsae,saelens']; "
                    f"runpy.run_path({os.path.join(ROOT, 'bench', 'bench_train.py')!r}, "
                    "run_name='__main__')")
  out = forks.run(script=str(script), warm=JAX, timeout=600)
  assert out.returncode != 0
  assert "pip install -e .[bench]" in out.stderr and "Traceback" not in out.stderr


def test_bench_match_smoke(forks, tmp_path):
  # Each (instance, size, method) in a new interpreter of its own: the benchmark's peak RSS.
  _run(forks, "bench_match.py", "--sizes=256", "--instances=planted", "--d_in=32",
       f"--json={tmp_path / 'r.jsonl'}", warm=())
  with open(tmp_path / "r.jsonl") as f:
    rows = {r["method"]: r for r in map(json.loads, f)}
  assert list(rows) == ["scipy", "sparse"]
  for r in rows.values():
    assert (r["instance"], r["n"]) == ("planted", 256)
    assert r["seconds"] > 0 and r["peak_rss_gb"] > 0 and r["rounds"] >= 0
  # The sparse solver certifies its matching optimal: it must reach scipy's objective.
  assert rows["scipy"]["objective"] > 0
  assert rows["sparse"]["objective"] == pytest.approx(rows["scipy"]["objective"], rel=1e-6)


def test_bench_kernels_smoke(forks):
  out = _run(forks, "bench_kernels.py", "--d_in=16", "--k=4", "--shapes=64x128", "--rounds=1",
             "--steps=2")
  row = json.loads(out.strip().splitlines()[-1])
  assert row["batch_x_latents"] == 64 * 128 and row["dense_ms"] > 0 and row["scatter_ms"] > 0
  if cpu_kernels.available():
    assert row["kernel_ms"] > 0 and row["scatter_over_kernel"] > 0


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels are not built here")
def test_bench_cpu_kernels_smoke(forks):
  out = _run(forks, "bench_cpu_kernels.py", "--d_in=16", "--k=4", "--shapes=64x128",
             "--rounds=1", "--calls=1")
  row = json.loads(out.strip().splitlines()[-1])
  for name in ("top_k", "gather_sum", "gather_dot", "scatter_rows"):
    assert row[f"{name}_kernel_ms"] > 0 and row[f"{name}_xla_ms"] > 0


def test_bench_seed_loop_smoke(forks):
  out = _run(forks, "bench_seed_loop.py", "--d_in=16", "--k=4", "--batch_size=64",
             "--num_latents=128", "--seeds=2", "--steps=2", "--rounds=1")
  row = json.loads(out.strip().splitlines()[-1])
  assert row["vmap_ms"] > 0 and row["unrolled_ms"] > 0 and row["lax_map_ms"] > 0
  assert row["chosen"] in ("vmap", "map")


def test_bench_step_parts_smoke(forks):
  out = _run(forks, "bench_step_parts.py", "--d_in=16", "--k=4", "--batch_size=64",
             "--num_latents=128", "--rounds=1")
  row = json.loads(out.strip().splitlines()[-1])
  assert row["step_ms"] > 0 and row["clip_and_adam_ms"] > 0


def test_bench_store_smoke(forks, tmp_path):
  out = _run(forks, "bench_store.py", "--rows=512", "--d_in=16", "--rows_per_shard=128",
             "--batch_size=32", "--steps=2", "--rounds=1")
  rows = {r["dtype"]: r for r in map(json.loads, out.strip().splitlines())}
  assert list(rows) == ["float32", "bfloat16", "int8", "float8_e4m3fn"]
  assert [rows[d]["bytes_per_token"] for d in rows] == [64, 32, 20, 20]  # 16 codes + 4 scale
  assert rows["float32"]["rel_l2_err_max"] == 0 and rows["int8"]["rel_l2_err_max"] < 0.02
  for r in rows.values():
    assert r["device_rows_per_s"] > 0 and r["host_rows_per_s"] > 0 and r["gather_rows_per_s"] > 0
    assert r["device_over_gather"] == pytest.approx(
        r["device_rows_per_s"] / r["gather_rows_per_s"], abs=2e-3)
  # The second form: stores of the same tokens compared row by row with a float32 one.
  from jaxsae import store_writer
  x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
  for d in ("float32", "int8"):
    store_writer.write_store(str(tmp_path / d), x, rows_per_shard=100, dtype=d)
  out = _run(forks, "bench_store.py", f"--reference={tmp_path / 'float32'}",
             f"--stores={tmp_path / 'int8'}")
  row = json.loads(out.strip().splitlines()[-1])
  assert row["dtype"] == "int8" and row["rows"] == 300 and 0 < row["rel_l2_err_mean"] < 0.02


def test_bench_memory_smoke(forks):
  out = _run(forks, "bench_memory.py", "--d_in=16", "--num_latents=64", "--k=4",
             "--batch_size=32", "--seeds=1,2")
  one, two = map(json.loads, out.strip().splitlines()[-2:])
  assert (one["seeds"], two["seeds"]) == (1, 2) and 0 < one["peak_gb"] < two["peak_gb"]


def test_bench_extract_smoke_on_gpt2(forks, tmp_path, tiny_model_dir):
  """Both forms on a GPT-2 layout (transformer.h), which the benchmark used to assume away."""
  import transformers
  import torch
  tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  tok.save_pretrained(tmp_path / "m")
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
      n_embd=32, n_layer=3, n_head=4, n_positions=128, vocab_size=len(tok),
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "m")
  common = [f"--model={tmp_path / 'm'}", "--site=mlp:1", "--num_tokens=512", "--ctx_len=64",
            "--rounds=1"]
  r = _printed_json(_run(forks, "bench_extract.py", *common, warm=TORCH))
  assert (r["tokens"], r["ctx_len"], r["device"]) == (512, 64, "cpu")
  for key in ("full_forward_tok_s", "decoder_stack_tok_s", "jaxsae_extract_tok_s",
              "speedup_vs_full_forward", "speedup_vs_decoder_stack"):
    assert r[key] > 0, key
  assert 0 < r["jaxsae_fraction_in_model"] <= 1
  assert r["ideal_speedup_vs_decoder_stack"] == 3 / 2  # the site ends block 1 of 3: 2 run
  r = _printed_json(_run(forks, "bench_extract.py", *common, "--variants=fp32,bf16,threads1",
                         "--dtype=int8", warm=TORCH))
  assert (r["tokens_per_round"], r["stored_dtype"], r["rounds"]) == (512, "int8", 1)
  assert r["rows_compared"] > 0
  assert [v["variant"] for v in r["variants"]] == ["fp32", "bf16", "threads1"]
  for v in r["variants"]:
    assert v["tok_s"] > 0 and v["ratio"] > 0 and len(v["rounds_tok_s"]) == 1
    assert 0 <= v["median_rel_err"] <= v["max_rel_err"] < 0.5
  assert r["variants"][0]["ratio"] == 1  # fp32 is the reference the others are timed against


def _printed_json(out: str) -> dict:
  """The JSON object a benchmark prints, indented, among its other lines."""
  start = 0 if out.startswith("{") else out.index("\n{\n") + 1
  return json.JSONDecoder().raw_decode(out[start:])[0]
