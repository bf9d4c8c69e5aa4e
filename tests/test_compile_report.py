"""The compile report: the run's own programs compiled by XLA's TPU compiler for a named slice,
on this CPU with no TPU (libtpu installed by the test command), checked against XLA's own
memory and cost analysis; the refusal of a run that would not fit; libtpu kept quiet."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsae import store_writer, tpu
from jaxsae.train import TrainConfig, compile_report, make_mesh, make_optimizer, resolve
from jaxsae.train.programs import build

# The paper's shape (Paulo & Belrose: TopK, 32K latents, k 32), 8 seeds, batch 16,384.
PAPER = dict(arch="topk", num_latents=32768, k=32, num_seeds=8, batch_size=16384,
             num_tokens=8_000_000_000)
D_IN = 768
# A user's shell, with no TPU settings and no XLA cache: a program compiled for a topology is
# written to the cache but cannot be read back without a TPU client (jax warns and compiles).
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TPU_ACCELERATOR_TYPE",
                          "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY",
                          "JAX_COMPILATION_CACHE_DIR")}
# XLA's TPU compiler at its least effort for execution time, in these tests alone: the paper's
# programs compile in half the time (v5e:2x2 44 s -> 22 s, ReLU at 131K latents 14 s -> 2 s).
# What the tests check holds of any program the compiler builds: the report is XLA's own
# analysis of it, the state is donated, the refusal names what then fits. The programs differ
# a little from a user's (bytes accessed within 21%: bench/bench_tpu_effort.py), whose reports
# compile at the default.
LEAST_EFFORT = -1.0
FAST_TPU_COMPILE = {"JAX_EXEC_TIME_OPTIMIZATION_EFFORT": str(LEAST_EFFORT)}


def _compiled(name: str, **flags):
  topo = tpu.topology(name)
  plan = resolve(TrainConfig(store="s", out="o", **{**PAPER, **flags}), D_IN, 10**9,
                 topo.devices)
  mesh = make_mesh(plan, topo.devices)
  p = build(plan, mesh, make_optimizer(plan)[0])
  compiled = compile_report.compile_programs(plan, p, mesh, scaled=False)
  r = compile_report.report(plan, compiled, name, topo.devices, topo,
                            plan.num_steps * plan.identity.batch_size)
  return topo, plan, compiled, r


# Each slice's compile (~40 s) is shared by the tests of that slice: they run on one worker.
@pytest.fixture(scope="module", ids=["one-host", "four-hosts"], params=[
    pytest.param(s, marks=[pytest.mark.slow, pytest.mark.xdist_group(f"compile {s}")])
    for s in ("v5e:2x2", "v5e:4x4")])
def paper(request):
  default = jax.config.jax_exec_time_optimization_effort
  jax.config.update("jax_exec_time_optimization_effort", LEAST_EFFORT)
  try:
    return _compiled(request.param)
  finally:
    jax.config.update("jax_exec_time_optimization_effort", default)


def test_the_report_is_xlas_own_memory_and_cost_analysis(paper):
  topo, plan, compiled, r = paper
  for name, c in compiled.items():
    m, cost, got = c.memory_analysis(), c.cost_analysis(), r.programs[name]
    assert (got.arguments, got.outputs, got.aliased, got.temporaries) == (
        m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
        m.temp_size_in_bytes)
    assert got.flops == cost["flops"]
    assert got.bytes_accessed == cost["bytes accessed"] + got.custom_call_bytes
  # The state each device holds is its seeds' own: W_enc, W_dec, their Adam moments.
  seeds_here = len(plan.seeds) // plan.execution.mesh[0]
  weights = 2 * D_IN * PAPER["num_latents"] * 4 * 3 * seeds_here
  assert weights <= r.programs["step"].arguments < 1.05 * weights
  # The step is donated: its output state is written over its input.
  assert r.programs["step"].aliased >= weights
  assert r.programs["init_from_first_batch"].aliased >= weights
  # Every number the report derives is the roofline of those on the chip's peaks.
  chip = topo.per_device
  step = r.programs["step"]
  assert r.step_seconds == max(step.flops / chip.bf16_flops, step.bytes_accessed /
                               chip.hbm_bandwidth)
  assert r.product_seconds == pytest.approx(
      2 * PAPER["batch_size"] / plan.execution.mesh[1] * D_IN * PAPER["num_latents"]
      * seeds_here / chip.bf16_flops, rel=0.02)
  assert r.tokens_per_s_per_seed == PAPER["batch_size"] / r.step_seconds
  assert r.chip_hours == pytest.approx(plan.num_steps * r.step_seconds * len(topo.devices) / 3600)
  assert r.rows_per_s_per_host == pytest.approx(PAPER["batch_size"] / r.step_seconds /
                                                topo.num_hosts)
  assert r.fits and r.peak_bytes <= chip.hbm_bytes
  # Planned as it will run on the chips: every k-sparse product on the MXU, TPU's top-k.
  e = plan.execution
  assert (e.backend, e.topk_path, e.topk_rule, e.compute_dtype, e.seed_loop, e.cpu_kernels) == (
      "tpu", "mxu", "approx", "bfloat16", "vmap", False)
  text = compile_report.describe(r)
  assert "fits" in text and "chip-hours" in text and r.topology in text


def test_multi_host_slices_split_the_batch_and_the_hosts_reads(paper):
  topo, plan, _, r = paper
  if topo.num_hosts == 1:
    assert plan.execution.mesh == (4, 1)
    return
  assert (topo.num_hosts, plan.execution.mesh) == (4, (8, 2))
  assert r.num_hosts == 4 and json.loads(json.dumps(r.to_json()))["num_hosts"] == 4


def _store(tmp_path):
  path = str(tmp_path / "store")
  store_writer.write_store(path, np.random.default_rng(0).normal(size=(256, D_IN)).astype(
      np.float32), dtype="bfloat16", rows_per_shard=256)
  return path


def _train(args, tmp_path):
  return subprocess.run([sys.executable, "-m", "jaxsae", "train", *args], capture_output=True,
                        text=True, env={**CLEAN_ENV, **FAST_TPU_COMPILE}, cwd=tmp_path,
                        timeout=900)


@pytest.mark.slow
def test_a_run_that_does_not_fit_is_refused_naming_what_would(tmp_path):
  """`jaxsae train --topology=... --compile_only`: refused in one line by what XLA's TPU
  compiler says of its HBM, naming the most seeds that fit; those then compile and fit. (ReLU's
  step compiles in a third of TopK's time; the refusal and what it names do not depend on the
  architecture, and TopK's programs compile for TPU in the `paper` fixture.)"""
  store = _store(tmp_path)
  common = [f"--store={store}", "--topology=v5e:2x2", "--arch=relu_l1", "--num_latents=131072",
            "--batch_size=4096", "--num_tokens=4096000"]
  res = _train([*common, f"--out={tmp_path / 'big'}", "--num_seeds=64"], tmp_path)
  assert res.returncode != 0
  (line,) = [l for l in res.stderr.splitlines() if "does not fit" in l]
  seeds = int(re.search(r"--num_seeds=(\d+)", line).group(1))
  assert 4 <= seeds < 64
  # What it names fits: compiled, reported, the report written, and libtpu silent throughout.
  out = tmp_path / "fits"
  res = _train([*common, f"--out={out}", f"--num_seeds={seeds}"], tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "TPU_WORKER_HOSTNAMES" not in res.stderr and "E0000" not in res.stderr, res.stderr
  report = json.loads((out / compile_report.REPORT_FILE).read_text())
  assert report["fits"] and report["shape"]["num_steps"] == 1000
  assert report["shape"]["seeds"] == seeds
  assert "fits:" in res.stdout and "chip-hours" in res.stdout
  assert not (out / "run.json").exists()  # a compile claims no run directory


def test_without_a_tpu_jax_starts_on_the_cpu_alone_and_silently():
  res = subprocess.run([sys.executable, "-c", "import jaxsae, jax; print(jax.devices())"],
                       capture_output=True, text=True, env=CLEAN_ENV, timeout=120)
  assert res.returncode == 0 and "CpuDevice" in res.stdout and "Tpu" not in res.stdout
  assert res.stderr.strip() == "", res.stderr


def test_an_unknown_topology_is_one_line(tmp_path):
  res = _train([f"--store={_store(tmp_path)}", f"--out={tmp_path / 'r'}", "--topology=v5e:3x3",
                "--num_latents=64", "--k=4"], tmp_path)
  assert res.returncode != 0 and "--topology=v5e:3x3" in res.stderr
