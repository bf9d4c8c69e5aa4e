"""The trainer's options beyond the shared-stream default: per-seed data orders (--data_seeds)
and an adapted penalty coefficient (--target_l0)."""

from __future__ import annotations

import json
import os
import textwrap

import jax
import numpy as np
import pytest

from conftest import cpu_devices_env, planted_sparse, train_config

from jaxsae import formats
from jaxsae import saes
from jaxsae import store as store_lib
from jaxsae import store_writer
from jaxsae import train
from jaxsae.errors import JaxsaeError

D_IN, N = 16, 64


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  x, _ = planted_sparse(8192, D_IN, 32, 3, 0)
  path = str(tmp_path_factory.mktemp("store") / "acts")
  store_writer.write_store(path, (x + 0.5).astype(np.float32), rows_per_shard=1024)
  return path


def config(store_dir, out, **kw):
  return train_config(store_dir, out, **{"num_tokens": 128 * 20, **kw})


def weights(path):
  return formats.stored(str(path))[0]


def assert_close(a, b, atol=1e-5):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(a[name], b[name], atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------
# --data_seeds


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["map", "vmap"])
def test_each_member_trains_as_a_lone_run_on_its_data_seed(store_dir, tmp_path, loop):
  """Seeds (0, 0) on data seeds (0, 1): one initialisation, two data orders; each member ends
  where a lone --seeds=0 run with that --data_seed does."""
  out = tmp_path / "per_seed"
  train.run(config(store_dir, out, seeds=(0, 0), data_seeds=(0, 1), seed_loop=loop))
  assert {"seed0_data0", "seed0_data1"} <= set(os.listdir(out))
  for d in (0, 1):
    alone = tmp_path / f"alone{d}"
    train.run(config(store_dir, alone, seeds=(0,), data_seed=d))
    member = out / f"seed0_data{d}"
    assert_close(weights(member), weights(alone / "seed0"))
    assert formats.stored(str(member))[1]["jaxsae"]["data_seed"] == d
  assert not np.allclose(weights(out / "seed0_data0")["W_dec"],
                         weights(out / "seed0_data1")["W_dec"])
  with open(out / "run.json") as f:
    assert json.load(f)["data_seeds"] == [0, 1]
  with open(out / "metrics.jsonl") as f:
    line = json.loads(f.readlines()[-1])
  assert line["seeds"] == [0, 0] and line["data_seeds"] == [0, 1]
  # Two data orders: the store is read twice as fast as each seed trains.
  assert line["tokens_per_s_stream"] == pytest.approx(2 * line["tokens_per_s_per_seed"])
  # match finds the members in order.
  assert [os.path.basename(p) for p in saes.discover([str(out)])] == ["seed0_data0",
                                                                      "seed0_data1"]


def test_per_seed_data_of_one_order_is_the_shared_stream(store_dir, tmp_path):
  """--data_seeds=0,0 feeds both seeds the batches the shared --data_seed=0 stream does."""
  train.run(config(store_dir, tmp_path / "shared"))
  train.run(config(store_dir, tmp_path / "per_seed", data_seeds=(0, 0)))
  for s in (0, 1):
    assert_close(weights(tmp_path / "per_seed" / f"seed{s}_data0"),
                 weights(tmp_path / "shared" / f"seed{s}"))


def test_data_seeds_are_checked_and_part_of_the_run(store_dir, tmp_path):
  with pytest.raises(JaxsaeError, match="gives 3 data seeds for 2 SAE seeds"):
    train.run(config(store_dir, tmp_path / "a", data_seeds=(0, 1, 2)))
  with pytest.raises(JaxsaeError, match="distinct pairs of seed and data seed"):
    train.run(config(store_dir, tmp_path / "b", seeds=(0, 0), data_seeds=(1, 1)))
  with pytest.raises(JaxsaeError, match="give one or more distinct seeds"):
    train.run(config(store_dir, tmp_path / "c", seeds=(0, 0)))
  out = tmp_path / "d"
  with pytest.raises(KeyboardInterrupt):
    train.run(config(store_dir, out, data_seeds=(0, 1)), interrupt_at=10)
  with pytest.raises(JaxsaeError, match=r"--data_seeds=\[0, 1\] there, \[1, 0\] now"):
    train.run(config(store_dir, out, data_seeds=(1, 0)))
  with pytest.raises(JaxsaeError, match=r"--data_seeds=\[0, 1\] there, \[\] now"):
    train.run(config(store_dir, out))
  train.run(config(store_dir, out, data_seeds=(0, 1)))  # the same flags resume
  assert {"seed0_data0", "seed1_data1"} <= set(os.listdir(out))


@pytest.mark.slow
def test_per_seed_data_over_8_devices_matches_one_device(forks, store_dir, tmp_path):
  """A 2x4 mesh (seeds over 2 devices, each member's batch over 4) gives the one-device result."""
  script = textwrap.dedent(f"""
      import jax
      from jaxsae import train
      assert jax.device_count() == 8
      train.run(train.TrainConfig(
          store={store_dir!r}, out={str(tmp_path / "mesh")!r}, mesh="2x4", num_latents={N}, k=4,
          seeds=(0, 0, 1, 1), data_seeds=(0, 1, 0, 1), batch_size=128, num_tokens=128 * 20,
          lr=1e-2, lr_warmup_steps=5, checkpoint_every=10, log_every=5, progress=False))
  """)
  # A process of its own (forked: tests/forks.py), whose jax starts with 8 CPU devices.
  (tmp_path / "eight.py").write_text(script)
  proc = forks.run(script=str(tmp_path / "eight.py"), env=cpu_devices_env(8), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  train.run(config(store_dir, tmp_path / "one", seeds=(0, 0, 1, 1), data_seeds=(0, 1, 0, 1)))
  for s in (0, 1):
    for d in (0, 1):
      name = f"seed{s}_data{d}"
      assert_close(weights(tmp_path / "mesh" / name), weights(tmp_path / "one" / name),
                   atol=1e-4)


# ---------------------------------------------------------------------------------------------
# --target_l0


def measured_l0(sae_dir, store_dir):
  """Mean active latents per token of the exported SAE over the whole store."""
  sae = saes.load_sae(str(sae_dir))
  graphdef, state = saes.encoder(sae)
  x = store_lib.Store(store_dir).rows(np.arange(8192))
  z = jax.jit(saes.encode, static_argnums=0)(graphdef, state, x, sae.input_scale)
  return float((np.asarray(z) > 0).sum(-1).mean())


@pytest.mark.parametrize("arch,target", [("relu_l1", 12), ("jumprelu", 6)])
def test_target_l0_lands_within_10_percent(store_dir, tmp_path, arch, target):
  out = tmp_path / arch
  cfg = config(store_dir, out, arch=arch, target_l0=target, num_tokens=128 * 300, lr=3e-3,
               lr_warmup_steps=20, checkpoint_every=1000, log_every=10, l1_coeff=1.0,
               l0_coeff=0.03, jumprelu_threshold=0.1, jumprelu_bandwidth=0.05)
  train.run(cfg)
  with open(out / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert lines[0]["penalty_mult"] == [1.0, 1.0]  # the coefficient's warmup: not yet adapted
  assert lines[-1]["penalty_mult"] != [1.0, 1.0]
  held = [line["penalty_mult"] for line in lines
          if line["step"] > (1 - cfg.target_l0_freeze) * 300 + 10]
  assert len(held) > 1 and all(m == held[0] for m in held)  # the end trains at one value
  for s in (0, 1):
    l0 = measured_l0(out / f"seed{s}", store_dir)
    assert abs(l0 - target) <= 0.1 * target, (s, l0)
    cfg = formats.stored(str(out / f"seed{s}"))[1]["jaxsae"]
    assert cfg["target_l0"] == target and cfg["penalty_mult"] == held[-1][s]


def test_jumprelu_thresholds_start_at_the_target(store_dir, tmp_path):
  """Without --jumprelu_threshold, each latent starts firing on target / n of the first batch
  (the published threshold starts the L0 too far off for Adam to bring it to the target)."""
  out = tmp_path / "run"
  train.run(config(store_dir, out, arch="jumprelu", target_l0=8, num_tokens=128 * 2,
                   log_every=1))
  with open(out / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  assert first["step"] == 1 and all(abs(l0 - 8) <= 0.5 for l0 in first["l0"]), first["l0"]


def test_target_l0_is_refused_where_k_sets_the_l0(store_dir, tmp_path):
  for arch in ("topk", "batchtopk"):
    with pytest.raises(JaxsaeError, match=f"--arch={arch} does not have \\(its L0 is set by "
                                          "--k\\)"):
      train.run(config(store_dir, tmp_path / arch, arch=arch, target_l0=8))
  with pytest.raises(JaxsaeError, match="--target_l0=100 must be between 0 and num_latents"):
    train.run(config(store_dir, tmp_path / "big", arch="relu_l1", target_l0=100))


def test_without_target_l0_the_state_has_no_multiplier():
  """Off by default: the state (and so the checkpoints) hold what they always did."""
  from flax import nnx
  from jaxsae.sae import ARCHITECTURES, SaeConfig
  tx, _ = train.make_optimizer(train.resolve(train.TrainConfig(), D_IN, 10**6))
  for adapt in (False, True):
    state = nnx.state(nnx.eval_shape(lambda: train.TrainState(
        ARCHITECTURES["relu_l1"], (0, 1), D_IN, N, SaeConfig(), tx, adapt_penalty=adapt)))
    assert ("penalty_mult" in state["seeds"]) == adapt
