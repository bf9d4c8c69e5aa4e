"""The TopK step compiled for Cloud TPU slices on this machine (no TPU): XLA's per-device flops,
bytes and memory for each topology and TopK path, the step's roofline time against the encoder
product's, and how many seeds fit a chip (docs/sizing.md). Estimates of XLA's cost model on
published peaks, not timings.

  python bench/bench_tpu.py --table --topologies=v5e:2x4,v6e:2x4 --paths=before,auto
  python bench/bench_tpu.py --sizing --generations=v4,v5e,v5p,v6e

"before" is the step as it compiled at d75d7bc (exact top-k, scatter-adds: --topk_rule=exact
--topk_backward=scatter reproduces that program); "auto" is what the plan picks for a TPU.
"""

from __future__ import annotations

import json
import math
import time

from absl import app, flags

from jaxsae import tpu
from jaxsae.train import TrainConfig, compile_report, make_mesh, make_optimizer, resolve
from jaxsae.train.programs import build

FLAGS = flags.FLAGS
flags.DEFINE_bool("table", False, "Per topology and path: flops, bytes, roofline.")
flags.DEFINE_bool("sizing", False, "Seeds per chip for each generation and shape.")
flags.DEFINE_list("topologies", ["v5e:2x4", "v6e:2x4"], "Slices for --table.")
flags.DEFINE_list("paths", ["before", "auto"], "TopK paths for --table.")
flags.DEFINE_list("generations", ["v4", "v5e", "v5p", "v6e"], "Generations for --sizing.")
flags.DEFINE_list("d_ins", ["768", "4096"], "d_in for --sizing.")
flags.DEFINE_list("widths", ["32768", "131072"], "Latents for --sizing.")
flags.DEFINE_integer("batch_size", 16384, "Tokens per step.")
flags.DEFINE_integer("num_seeds", 8, "Seeds for --table.")
flags.DEFINE_string("out", "", "Write the rows as JSON here.")

PATHS = {"before": dict(topk_rule="exact", topk_backward="scatter"), "auto": {}}
# One host's slice of each generation, as libtpu names it, for --sizing.
SMALL = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def compile_one(topology: str, d_in: int, **flags_):
  topo = tpu.topology(topology)
  cfg = TrainConfig(store="s", out="o", arch="topk", k=32, batch_size=FLAGS.batch_size,
                    num_tokens=FLAGS.batch_size * 1000, **flags_)
  plan = resolve(cfg, d_in, 10**9, topo.devices)
  mesh = make_mesh(plan, topo.devices)
  p = build(plan, mesh, make_optimizer(plan)[0])
  t = time.perf_counter()
  compiled = compile_report.compile_programs(plan, p, mesh, scaled=False)
  r = compile_report.report(plan, compiled, topology, topo.devices, topo,
                            plan.num_steps * plan.identity.batch_size)
  return topo, plan, r, time.perf_counter() - t


def table() -> list[dict]:
  rows = []
  for topology in FLAGS.topologies:
    for path in FLAGS.paths:
      topo, plan, r, secs = compile_one(topology, 768, num_latents=32768,
                                        num_seeds=FLAGS.num_seeds, **PATHS[path])
      step = r.programs["step"]
      row = dict(topology=topology, path=path, execution=plan.execution.describe(),
                 mesh=plan.execution.mesh, flops_T=step.flops / 1e12,
                 bytes_GB=step.bytes_accessed / 1e9, temporaries_GB=step.temporaries / 1e9,
                 state_GB=step.arguments / 1e9, step_ms=r.step_seconds * 1e3, bound=r.bound,
                 product_ms=r.product_seconds * 1e3,
                 ratio=r.step_seconds / r.product_seconds, compile_s=secs)
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def sizing() -> list[dict]:
  """Seeds per chip: each shape compiled with one seed per device, its step's state and peak
  per seed from XLA's buffer assignment, and the seeds that fit the chip's HBM at that rate
  (the state grows with the seeds on a device; the [batch, latents] temporaries do too, under
  the seeds' vmap)."""
  rows = []
  for gen in FLAGS.generations:
    for d_in in map(int, FLAGS.d_ins):
      for width in map(int, FLAGS.widths):
        topo = tpu.topology(SMALL[gen])
        n = len(topo.devices)
        hbm = topo.per_device.hbm_bytes
        try:
          _, plan, r, secs = compile_one(SMALL[gen], d_in, num_latents=width, num_seeds=n)
        except compile_report.DoesNotFit as e:
          row = dict(generation=gen, topology=SMALL[gen], d_in=d_in, num_latents=width,
                     batch_size=FLAGS.batch_size, hbm_GB=hbm / 1e9, seeds_per_device=0,
                     seeds_per_chip=0, devices_per_chip=topo.devices_per_chip,
                     required_GB=e.required / 1e9)
          print(json.dumps(row), flush=True)
          rows.append(row)
          continue
        state = r.programs["step"].arguments
        per_seed = r.peak_bytes
        row = dict(generation=gen, topology=SMALL[gen], d_in=d_in, num_latents=width,
                   batch_size=FLAGS.batch_size, state_GB=state / 1e9,
                   peak_one_seed_GB=per_seed / 1e9, hbm_GB=hbm / 1e9,
                   seeds_per_device=int(hbm // per_seed) if per_seed <= hbm else 0,
                   devices_per_chip=topo.devices_per_chip,
                   step_ms=r.step_seconds * 1e3, ratio=r.step_seconds / r.product_seconds,
                   compile_s=secs)
        row["seeds_per_chip"] = row["seeds_per_device"] * topo.devices_per_chip
        print(json.dumps(row), flush=True)
        rows.append(row)
  return rows


def main(argv):
  del argv
  rows = (table() if FLAGS.table else []) + (sizing() if FLAGS.sizing else [])
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
