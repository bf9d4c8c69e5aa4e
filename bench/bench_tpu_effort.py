"""XLA's TPU compile at its default execution-time effort against its least (-1): each config's
programs (`programs.build`: init, the first batch's init, the step) compiled both ways on this
machine (no TPU), the compile's time and what XLA's analyses then say of the step. Estimates of
XLA's model, not timings; the compile times are this machine's.

  python bench/bench_tpu_effort.py          # every config below
  python bench/bench_tpu_effort.py 0 3      # the first and the fourth
"""

import sys
import time

from jaxsae import tpu
from jaxsae.train import TrainConfig, compile_report as cr, make_mesh, make_optimizer, resolve
from jaxsae.train.programs import build

D_IN = 768
CONFIGS = [
    ("v5e:2x2", dict(arch="topk", num_latents=32768, k=32, num_seeds=8, batch_size=16384)),
    ("v5e:4x4", dict(arch="topk", num_latents=32768, k=32, num_seeds=8, batch_size=16384)),
    ("v6e:2x4", dict(arch="topk", num_latents=32768, k=32, num_seeds=8, batch_size=16384)),
    ("v5e:2x2", dict(arch="relu_l1", num_latents=131072, num_seeds=64, batch_size=4096)),
    ("v5e:2x2", dict(arch="relu_l1", num_latents=131072, num_seeds=20, batch_size=4096)),
    ("v5e:2x4", dict(arch="batchtopk", num_latents=65536, k=64, num_seeds=8, batch_size=8192)),
    ("v5e:2x4", dict(arch="jumprelu", num_latents=65536, num_seeds=16, batch_size=8192)),
]


def compiled(p, rows, effort: float) -> tuple[dict, float]:
  """name -> ProgramCost (or the compiler's out-of-memory line), and the seconds it took."""
  out, start = {}, time.perf_counter()
  for name, lower in [("init", lambda: p.init.lower()),
                      ("init_from_first_batch",
                       lambda: p.init_from_first_batch.lower(p.abstract_state, rows)),
                      ("step", lambda: p.step.lower(p.abstract_state, rows))]:
    try:
      out[name] = cr.program_cost(lower().compile(
          compiler_options={"exec_time_optimization_effort": effort}))
    except Exception as e:  # RESOURCE_EXHAUSTED: the program would not fit
      out[name] = str(e).splitlines()[0][:160]
  return out, time.perf_counter() - start


for i in [int(a) for a in sys.argv[1:]] or range(len(CONFIGS)):
  name, flags = CONFIGS[i]
  topo = tpu.topology(name)
  plan = resolve(TrainConfig(store="s", out="o", num_tokens=10**9, **flags), D_IN, 10**9,
                 topo.devices)
  mesh = make_mesh(plan, topo.devices)
  p = build(plan, mesh, make_optimizer(plan)[0])
  rows = cr._abstract_rows(p, plan, False)
  (default, t0), (least, t1) = compiled(p, rows, 0.0), compiled(p, rows, -1.0)
  print(f"[{i}] {name} {flags}: compile {t0:.1f} s at the default, {t1:.1f} s at -1; the same "
        f"programs' analyses: {default == least}", flush=True)
  for prog in default:
    a, b = default[prog], least[prog]
    if isinstance(a, str) or isinstance(b, str):
      print(f"    {prog}: {a}\n    {'':{len(prog)}}  {b}")
    else:
      print(f"    {prog}: flops {a.flops / 1e12:.3f} / {b.flops / 1e12:.3f} T, bytes "
            f"{a.bytes_accessed / 1e9:.2f} / {b.bytes_accessed / 1e9:.2f} GB, temporaries "
            f"{a.temporaries / 1e9:.2f} / {b.temporaries / 1e9:.2f} GB, peak "
            f"{a.peak / 1e9:.2f} / {b.peak / 1e9:.2f} GB")
