"""The multi-seed trainer: outputs, seeds under vmap, resumption, sharding, bad input, export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import textwrap

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from conftest import cpu_devices_env, planted_sparse, train_config as config

from jaxsae import formats
from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae import cpu_kernels
from jaxsae import saes
from jaxsae import train
from jaxsae.errors import JaxsaeError

D_IN, N = 16, 64


def planted(n_rows=8192, d=D_IN, n_feat=32, k=3, seed=0):
  x, _ = planted_sparse(n_rows, d, n_feat, k, seed)
  return (x + 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("store") / "acts")
  store_writer.write_store(path, planted(), rows_per_shard=1024)
  return path


def exported(out, seeds=(0, 1)):
  return {s: formats.stored(os.path.join(str(out), f"seed{s}"))[0] for s in seeds}


def assert_same(a, b, exact=True, atol=1e-5):
  assert a.keys() == b.keys()
  for s in a:
    for name in a[s]:
      if exact:
        np.testing.assert_array_equal(a[s][name], b[s][name], err_msg=f"seed {s} {name}")
      else:
        np.testing.assert_allclose(a[s][name], b[s][name], atol=atol, err_msg=f"seed {s} {name}")


@pytest.fixture(scope="module")
def reference(store_dir, tmp_path_factory):
  """One uninterrupted 2-seed TopK run that several tests compare against."""
  out = tmp_path_factory.mktemp("ref") / "run"
  train.run(config(store_dir, out))
  return out


def _tensorboard_events(path):
  """Event protos of a TensorBoard file (TFRecord: length, crc, data, crc)."""
  import struct
  from tensorboardX.proto.event_pb2 import Event
  data, out, i = open(path, "rb").read(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out


def test_run_writes_metrics_checkpoints_and_exports(reference):
  with open(reference / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [r["step"] for r in lines] == list(range(5, 41, 5))
  for key in ("fvu", "l0", "dead", "aux", "loss"):
    assert len(lines[-1][key]) == 2  # one value per seed
  assert lines[-1]["l0"] == [4.0, 4.0]
  assert all(f < 0.7 * f0 for f, f0 in zip(lines[-1]["fvu"], lines[0]["fvu"]))
  assert lines[-1]["tokens_per_seed"] == 40 * 128
  rates = [lines[-1][f"tokens_per_s_{of}"] for of in ("per_seed", "stream", "all_seeds")]
  assert rates[0] > 0 and rates[1] == rates[0] and rates[2] == pytest.approx(2 * rates[0])
  # How long the steps waited for the store: told for every logged interval.
  assert all(r["input_wait_s"] >= 0 and 0 <= r["input_wait_frac"] <= 1 for r in lines)
  assert sorted(os.listdir(reference / "checkpoints")) == ["20", "30", "40"]  # keep the last 3
  (events,) = os.listdir(reference / "tensorboard")
  tags = {v.tag for e in _tensorboard_events(reference / "tensorboard" / events)
          for v in e.summary.value}
  assert {"seed0/fvu", "seed1/l0", "seed1/dead", "seed0/aux", "lr"} <= tags
  params = exported(reference)
  for s, p in params.items():
    assert p["W_enc"].shape == (D_IN, N) and p["W_dec"].shape == (N, D_IN)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(params[0]["W_dec"], params[1]["W_dec"])  # seeds differ
  with open(reference / "seed1" / "cfg.json") as f:
    cfg = json.load(f)
  assert cfg["k"] == 4 and cfg["d_in"] == D_IN and cfg["num_latents"] == N
  assert cfg["jaxsae"]["seed"] == 1 and cfg["jaxsae"]["num_tokens"] == 40 * 128


def test_same_flags_same_numbers(store_dir, reference, tmp_path):
  train.run(config(store_dir, tmp_path / "run"))
  assert_same(exported(tmp_path / "run"), exported(reference))


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["vmap", "map"])
def test_seeds_together_equal_separate_runs(store_dir, tmp_path, loop):
  # One CPU device: the seeds batched where jaxsae's kernels run, else one after another.
  seed_loop = lambda cfg: train.resolve(cfg, D_IN, 10**6).execution.seed_loop
  small = train.TrainConfig(num_latents=1024, batch_size=256)
  assert seed_loop(small) == ("vmap" if cpu_kernels.available() else "map")
  large = train.TrainConfig(num_latents=4096, batch_size=4096)
  assert seed_loop(large) == "map"
  assert seed_loop(dataclasses.replace(large, seeds=(0,))) == (
      "vmap" if cpu_kernels.available() else "map")
  assert seed_loop(dataclasses.replace(small, topk_backward="scatter")) == "map"
  assert seed_loop(train.TrainConfig(arch="relu_l1", topk_backward="scatter")) == "vmap"
  # Each case trains its own loop, named: `reference` runs auto, which is vmap wherever the
  # kernels are, so comparing against it would test map against vmap only by name.
  cfg = config(store_dir, tmp_path / loop, seed_loop=loop)
  assert seed_loop(cfg) == loop
  train.run(cfg)
  together = exported(tmp_path / loop)
  for s in (0, 1):
    train.run(config(store_dir, tmp_path / f"s{s}", seeds=(s,)))
    alone = exported(tmp_path / f"s{s}", seeds=(s,))
    assert_same(alone, {s: together[s]}, exact=False)


def test_kill_and_resume_equals_uninterrupted(store_dir, reference, tmp_path):
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out), interrupt_at=27)  # dies 7 steps after checkpoint 20
  assert not os.path.exists(out / "seed0")
  train.run(config(store_dir, out))
  assert_same(exported(out), exported(reference))
  with open(out / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(5, 41, 5))  # the lines past checkpoint 20 were logged once


def test_run_of_the_trainer_before_the_run_plan_resumes(store_dir, reference, tmp_path):
  """run.json as f8a510c's trainer wrote it (its resolved settings as a flat dict, identity and
  derived settings alike, no execution record): the run resumes where it stopped and ends where
  an uninterrupted one does; run.json is then the plan's."""
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out), interrupt_at=27)
  old = {"arch": "topk", "d_in": D_IN, "num_latents": N, "k": 4, "seeds": [0, 1],
         "batch_size": 128, "data_seed": 0, "site": None, "data_seeds": [], "target_l0": None,
         "matryoshka_widths": [], "normalize": False, "num_steps": 40,
         "compute_dtype": "float32", "lr": 0.01, "keep_steps": [], "store": store_dir,
         "state_format": "nnx-1"}
  (out / "run.json").write_text(json.dumps(old))
  train.run(config(store_dir, out))
  assert_same(exported(out), exported(reference))
  with open(out / "run.json") as f:
    now = json.load(f)
  assert {k: now[k] for k in now if k != "execution"} == {
      k: v for k, v in old.items() if k not in ("num_steps", "compute_dtype", "lr", "keep_steps")}
  assert now["execution"]["compute_dtype"] == "float32"


def test_killed_after_the_last_checkpoint_exports_on_rerun(store_dir, reference, tmp_path):
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out), interrupt_at=40)  # the final checkpoint, not the export
  assert not os.path.exists(out / "seed0")
  train.run(config(store_dir, out))  # no step left to take: it only exports
  assert_same(exported(out), exported(reference))


# The failed restore of the broken checkpoint leaves an orbax/tensorstore callback that fires
# after its event loop closed; harmless, and not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_half_written_checkpoints_are_skipped(store_dir, reference, tmp_path):
  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out), interrupt_at=20)
  ckpts = out / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["10", "20"]
  # A save cut short by a kill: orbax's temporary directory, never renamed into place...
  shutil.copytree(ckpts / "20", ckpts / "30.orbax-checkpoint-tmp-1234")
  # ...and a final-named one whose array data is gone.
  shutil.rmtree(ckpts / "20" / "default" / "d")
  train.run(config(store_dir, out))
  assert_same(exported(out), exported(reference))


@pytest.mark.parametrize("arch", ["relu_l1", "gated", "jumprelu", "batchtopk"])
def test_other_architectures_train_and_export(store_dir, tmp_path, arch):
  out = tmp_path / "run"
  train.run(config(store_dir, out, arch=arch, l1_coeff=1.0, l0_coeff=0.03,
                   jumprelu_threshold=0.1, jumprelu_bandwidth=0.05))
  with open(out / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert all(f < f0 for f, f0 in zip(lines[-1]["fvu"], lines[0]["fvu"]))
  params, cfg = formats.stored(str(out / "seed0"))
  assert cfg["jaxsae"]["arch"] == arch
  assert set(params) >= {"W_enc", "b_enc", "W_dec", "b_dec"}
  assert cfg["jaxsae"]["input_scale_folded"] != 1.0 or arch == "batchtopk"  # --normalize default
  assert formats.layout_of(str(out / "seed0")) == "saelens"  # sparsify would read it as TopK
  assert cfg["jaxsae"]["apply_b_dec_to_input"] == (arch != "relu_l1")
  extra = {"relu_l1": set(), "gated": {"r_mag", "b_mag"}, "jumprelu": {"threshold"},
           "batchtopk": {"threshold"}}[arch]
  assert set(params) - {"W_enc", "b_enc", "W_dec", "b_dec"} == extra
  if arch == "jumprelu":
    assert (params["threshold"] > 0).all()


def test_keep_at_tokens_exports_snapshots(store_dir, tmp_path):
  out = tmp_path / "run"
  train.run(config(store_dir, out, keep_at_tokens=(128 * 10, 128 * 25), checkpoint_every=100,
                   keep_checkpoints=1))
  assert sorted(os.listdir(out / "checkpoints")) == ["10", "25", "40"]
  params, cfg = formats.stored(str(out / "tokens1280" / "seed1"))
  assert cfg["jaxsae"]["num_tokens"] == 1280


def test_bad_input_is_one_clear_error(store_dir, tmp_path):
  with pytest.raises(JaxsaeError, match="--k=64"):
    train.run(config(store_dir, tmp_path / "a", k=64))
  with pytest.raises(JaxsaeError, match="--mesh=2x1 has 2 devices"):
    train.run(config(store_dir, tmp_path / "b", mesh="2x1"))
  with pytest.raises(JaxsaeError, match="less than one batch"):
    train.run(config(store_dir, tmp_path / "c", num_tokens=100))
  # Flags that change the model on resume, and a store of another width.
  out = tmp_path / "d"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out), interrupt_at=10)
  with pytest.raises(JaxsaeError, match="--num_latents=64 there, 32 now"):
    train.run(config(store_dir, out, num_latents=32))
  other = str(tmp_path / "other_store")
  store_writer.write_store(other, np.ones((512, 8), np.float32))
  with pytest.raises(JaxsaeError, match="d_in=8 but the run .* d_in=16"):
    train.run(config(other, out))


def test_non_finite_loss_stops_at_last_good_checkpoint(store_dir, tmp_path):
  out = tmp_path / "run"
  cfg = config(store_dir, out, arch="relu_l1", lr=1e36, lr_warmup_steps=0, max_grad_norm=0.0,
               checkpoint_every=1, log_every=1)
  with pytest.raises(JaxsaeError, match=r"seed \d: non-finite loss at step \d+"):
    train.run(cfg)
  assert not os.path.exists(out / "seed0")  # nothing exported
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.abspath(out / "checkpoints")) as mngr:
    state = mngr.restore(mngr.latest_step())
  for leaf in jax.tree.leaves(state):
    assert np.isfinite(np.asarray(leaf, np.float64)).all()


def test_ensemble_state_is_sharded_by_seed_from_its_modules():
  """Every variable of the ensemble carries the seed axis first, named in the modules'
  sharding metadata; only what is not per seed (the stream's step) is replicated. The
  optimizer keeps moments for the nnx.Params alone."""
  from flax import nnx
  from jaxsae.sae import ARCHITECTURES, SaeConfig
  plan = train.resolve(train.TrainConfig(num_latents=N, k=4, seeds=(0, 1, 2), batch_size=128,
                                         lr=1e-3, lr_warmup_steps=5), D_IN, 40 * 128)
  tx, _ = train.make_optimizer(plan)
  for arch in ("topk", "batchtopk"):
    abstract = nnx.state(nnx.eval_shape(lambda: train.TrainState(
        ARCHITECTURES[arch], (0, 1, 2), D_IN, N, SaeConfig(k=4), tx)))
    mesh = train.make_mesh(plan)
    specs = jax.tree_util.tree_flatten_with_path(train.state_shardings(abstract, mesh))[0]
    for path, sharding in specs:
      where = jax.tree_util.keystr(path)
      if where.startswith("['seeds']"):
        assert sharding.spec[0] == "seed", where
      else:
        assert where.startswith("['step']") and sharding.spec == P(), where
    mu = abstract["seeds"]["opt"]["opt_state"][1][0]["mu"]
    assert set(mu.keys()) == {"W_enc", "b_enc", "W_dec", "b_dec"}  # no threshold, no counters


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_the_plan_decides_on_the_host_and_nothing_traced_probes(arch, monkeypatch):
  """The execution is decided in resolve; tracing the step (and the first batch's init) asks
  neither the backend nor whether the CPU kernels run."""
  from flax import nnx
  plan = train.resolve(train.TrainConfig(arch=arch, num_latents=N, k=4, seeds=(0, 1),
                                         batch_size=128, target_l0=4 if arch == "jumprelu"
                                         else None), D_IN, 40 * 128)
  assert plan.sae.cpu_kernels == cpu_kernels.available()
  assert plan.sae.topk_path == plan.execution.topk_path
  tx, _ = train.make_optimizer(plan)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: train.TrainState.of(plan, tx)))

  def probed(*_):
    raise AssertionError("the environment was probed while tracing")

  monkeypatch.setattr(cpu_kernels, "available", probed)
  monkeypatch.setattr(jax, "default_backend", probed)
  x = jax.ShapeDtypeStruct((128, D_IN), np.float32)
  jax.eval_shape(train.init_from_first_batch, graphdef, state, x)
  jax.eval_shape(train.make_step(graphdef, plan), state, x)


class _Poisoned:
  """A plan field the programs must not read: any use of it fails the test."""

  def __init__(self, name):
    self.name = name  # found without __getattr__, which only missing attributes reach

  def _used(self, *_, **__):
    raise AssertionError(f"a jitted program read the plan's {self.name}")

  __getattr__ = __str__ = __repr__ = __fspath__ = __bool__ = __iter__ = __len__ = _used
  __eq__ = __hash__ = __int__ = __index__ = __format__ = _used


def test_a_runs_programs_are_built_once_for_what_they_compute(store_dir, tmp_path):
  """A second run of the same shape in the process gets the first one's jitted programs (no
  trace, no compile), whatever the two write to or how they log; the fields the cache leaves
  out of its key are ones the programs never read (traced and lowered here with each one
  poisoned); any other difference builds anew."""
  from jaxsae.train import programs
  plan = train.resolve(config(store_dir, tmp_path / "a"), D_IN, 40 * 128)
  mesh = train.make_mesh(plan)
  poisoned = dataclasses.replace(plan, **{f: _Poisoned(f) for f in programs.HOST_FIELDS})
  p = train.build(poisoned, mesh, train.make_optimizer(plan)[0])
  rows = store_lib.Rows(jax.ShapeDtypeStruct((128, D_IN), np.float32,
                                             sharding=p.batch_sharding.codes))
  p.init.lower()
  p.init_from_first_batch.lower(p.abstract_state, rows)
  p.step.lower(p.abstract_state, rows)

  elsewhere = train.resolve(config(store_dir, tmp_path / "b", log_every=7, checkpoint_every=3,
                                   progress=True, store_window=2), D_IN, 40 * 128)
  assert elsewhere != plan
  first = programs.of_plan(plan, mesh)
  assert programs.of_plan(elsewhere, mesh) is first
  for other in (dict(lr=2e-2), dict(seeds=(0, 2)), dict(num_tokens=128 * 41)):
    changed = train.resolve(config(store_dir, tmp_path / "c", **other), D_IN, 41 * 128)
    assert programs.of_plan(changed, mesh) is not first, other
  assert programs.of_plan(plan, mesh, input_scale=2.0) is not first
  assert programs.of_plan(plan, mesh, scaled=True) is not first


def test_run_of_the_dict_based_trainer_is_refused_in_one_line(store_dir, tmp_path):
  out = tmp_path / "old"
  out.mkdir()
  spec = train.resolve(config(store_dir, out), D_IN, 8192).identity.to_json()
  (out / "run.json").write_text(json.dumps({**spec, "store": store_dir}))  # no state_format
  with pytest.raises(JaxsaeError, match="dict-based trainer .* cannot be resumed; train into "
                                        "a new --out"):
    train.run(config(store_dir, out))


@pytest.mark.slow
def test_sharded_over_8_devices_matches_one_device(forks, store_dir, tmp_path):
  """4x2 and 2x4 meshes of 8 CPU devices give the one-device result, within float tolerance."""
  script = textwrap.dedent(f"""
      import jax
      from jaxsae import train
      from jaxsae.errors import JaxsaeError
      assert jax.device_count() == 8
      base = dict(store={store_dir!r}, num_latents={N}, k=4, seeds=(0, 1, 2, 3),
                  batch_size=128, num_tokens=128 * 20, lr=1e-2, lr_warmup_steps=5,
                  checkpoint_every=10, log_every=5, progress=False)
      for mesh in ("4x2", "2x4"):
        train.run(train.TrainConfig(out={str(tmp_path)!r} + "/" + mesh, mesh=mesh, **base))
      for bad in (dict(mesh="8x1"), dict(mesh="4x2", seed_loop="map")):
        try:
          train.run(train.TrainConfig(out={str(tmp_path)!r} + "/bad", **bad, **base))
        except JaxsaeError as e:
          print("ERROR:", e)
  """)
  # A process of its own (forked: tests/forks.py), whose jax starts with 8 CPU devices.
  (tmp_path / "eight.py").write_text(script)
  proc = forks.run(script=str(tmp_path / "eight.py"), env=cpu_devices_env(8), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ERROR: mesh seed axis 8 does not divide the 4 seeds" in proc.stdout
  assert "ERROR: --seed_loop=map runs the seeds one after another" in proc.stdout
  cfg = config(store_dir, tmp_path / "one", seeds=(0, 1, 2, 3), num_tokens=128 * 20)
  train.run(cfg)
  one = exported(tmp_path / "one", seeds=(0, 1, 2, 3))
  for mesh in ("4x2", "2x4"):
    assert_same(exported(tmp_path / mesh, seeds=(0, 1, 2, 3)), one, exact=False, atol=1e-4)


def test_sparsify_loads_export_and_reproduces_reconstructions(reference, store_dir):
  pytest.importorskip("sparsify")
  import torch
  from sparsify import SparseCoder

  from jaxsae.sae import SaeConfig, TopK
  sae = SparseCoder.load_from_disk(reference / "seed0")
  assert sae.num_latents == N and sae.cfg.k == 4
  x = store_lib.Store(store_dir).batch(0, 256)
  with torch.no_grad():
    theirs = sae(torch.from_numpy(x)).sae_out.numpy()
  params, _ = formats.stored(str(reference / "seed0"))
  ours_sae = TopK.from_weights(params, SaeConfig(k=4))
  ours = np.asarray(ours_sae.decode(ours_sae.encode(x)))
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


@pytest.mark.slow
def test_cli_flags_reach_the_trainer(forks, store_dir, tmp_path):
  out = tmp_path / "run"
  cmd = ["train", f"--store={store_dir}", f"--out={out}", f"--num_latents={N}", "--k=4",
         "--seeds=3,5", "--batch_size=128", "--num_tokens=1280", "--lr_warmup_steps=2",
         "--noprogress"]
  proc = forks.run(*cmd, timeout=120)  # `python -m jaxsae.cli ...`, forked (tests/forks.py)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl", "run.json", "seed3", "seed5",
                                     "tensorboard"]
  proc = forks.run(*cmd[:-1], "--k=64", timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("jaxsae train: error: --k=64")
