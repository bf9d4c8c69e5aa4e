"""What a run will cost on its chips, from XLA's compiler alone: the compile report.

`report(plan, programs, topology)` compiles the run's own programs (`programs.build`: the
state's init, the first batch's init, the step) for the plan's mesh, on a TPU topology's devices
(`jaxsae.tpu.topology`: no TPU needed) or on this machine's, and reads back XLA's buffer
assignment (`memory_analysis`) and cost model (`cost_analysis`). The step's time is then its
roofline on the chip's published peaks, max(flops / FLOP/s, bytes / HBM bandwidth), beside the
same for the one product every step must do (the encoder's x @ W_enc): these are estimates of
XLA's model, not timings. A custom call's cost (a kernel XLA cannot see into) is counted from
its shapes, the bytes it must read and write, and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import store as store_lib
from jaxsae.errors import JaxsaeError
from jaxsae.tpu import Chip, Topology
from jaxsae.train.plan import RunPlan

REPORT_FILE = "compile_report.json"
GB = 1e9


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """One compiled program, per device: XLA's buffer assignment and cost model."""
  arguments: int
  outputs: int
  aliased: int  # outputs written over donated arguments
  temporaries: int
  peak: int  # the most live at once, as XLA's assignment gives it
  flops: float
  bytes_accessed: float
  xla_seconds: float | None  # XLA's own estimate, where it gives one (positive)
  custom_calls: tuple[str, ...]  # targets counted from their shapes, not by XLA's model
  custom_call_bytes: float


def program_cost(compiled) -> ProgramCost:
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  calls, extra = _custom_calls(compiled.as_text())
  peak = getattr(m, "peak_memory_in_bytes", 0) or (
      m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
      - m.alias_size_in_bytes)
  seconds = cost.get("optimal_seconds")
  return ProgramCost(
      arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
      aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes, peak=int(peak),
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)) + extra,
      xla_seconds=float(seconds) if seconds is not None and seconds > 0 else None,
      custom_calls=calls, custom_call_bytes=extra)


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)"
                    r"\[([0-9,]*)\]")
_BITS = {"pred": 8, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "s16": 16, "u16": 16,
         "bf16": 16, "f16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}


def _modelled(target: str) -> bool:
  """XLA's own custom calls (its TPU lowering's PartialReduce, AssumeGatherIndicesInBound,
  ConcatBitcast, the sharding markers: CamelCase names) are in its cost model already; a Pallas
  kernel (tpu_custom_call) or an FFI target (jaxsae_*, snake_case) is not."""
  return target[:1].isupper()


def _custom_calls(hlo: str) -> tuple[tuple[str, ...], float]:
  """The custom calls in compiled HLO that XLA's model does not see into, and the bytes their
  operands and results hold (what such a kernel must at least read and write)."""
  names, total = [], 0.0
  for line in hlo.splitlines():
    if "custom-call(" not in line:
      continue
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if not target or _modelled(target.group(1)):
      continue
    names.append(target.group(1))
    for dtype, dims in _SHAPE.findall(line.split("custom_call_target")[0]):
      total += math.prod(int(d) for d in dims.split(",") if d) * _BITS[dtype] / 8
  return tuple(sorted(set(names))), total


@dataclasses.dataclass(frozen=True)
class Report:
  topology: str  # as given, or this machine's backend
  device_kind: str
  num_devices: int
  num_hosts: int
  chip: dict[str, Any] | None  # one device's peaks (Chip), None off TPU
  execution: str  # the plan's choices, as the run prints them
  shape: dict[str, Any]  # arch, seeds, d_in, num_latents, k, batch_size, num_steps
  programs: dict[str, ProgramCost]  # init, init_from_first_batch, step, encoder_product
  hbm_bytes: float | None
  peak_bytes: int  # the largest program's peak: what the run needs per device
  fits: bool | None  # None where the device's memory is unknown
  step_seconds: float | None  # by the roofline
  product_seconds: float | None
  bound: str | None  # "memory" or "compute", which the step's roofline is set by
  tokens_per_s_per_seed: float | None
  chip_hours: float | None  # for the run's tokens, every chip of the slice
  rows_per_s_per_host: float | None  # what each host's reader must deliver to keep up

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["programs"] = {k: dataclasses.asdict(v) for k, v in self.programs.items()}
    return out


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, str]:
  """(seconds, bound) of a program doing `flops` and moving `bytes_accessed` on one device."""
  compute, memory = flops / chip.bf16_flops, bytes_accessed / chip.hbm_bandwidth
  return max(compute, memory), "compute" if compute >= memory else "memory"


def _abstract_rows(p, plan: RunPlan, scaled: bool) -> store_lib.Rows:
  """The step's batch as ShapeDtypeStructs with their shardings: codes as stored (bfloat16,
  or 8-bit with a float32 factor per row)."""
  i = plan.identity
  lead = (len(i.seeds),) if i.data_seeds else ()
  codes = jax.ShapeDtypeStruct(lead + (i.batch_size, i.d_in),
                               jnp.int8 if scaled else jnp.bfloat16,
                               sharding=p.batch_sharding.codes)
  factor = (jax.ShapeDtypeStruct(lead + (i.batch_size,), jnp.float32,
                                 sharding=p.batch_sharding.factor) if scaled else None)
  return store_lib.Rows(codes, factor)


def _encoder_product(plan: RunPlan, mesh):
  """x @ W_enc for every seed at the step's shapes and shardings: the floor of the step."""
  i = plan.identity
  dt = jnp.dtype(plan.execution.compute_dtype)
  x = jax.ShapeDtypeStruct((i.batch_size, i.d_in), dt,
                           sharding=NamedSharding(mesh, P("data", None)))
  w = jax.ShapeDtypeStruct((len(i.seeds), i.d_in, i.num_latents), dt,
                           sharding=NamedSharding(mesh, P("seed", None, None)))
  # Summed over the latents so no [B, n] output is written: only its flops are the yardstick.
  out = NamedSharding(mesh, P("seed", "data"))
  fn = jax.jit(lambda x, w: jnp.einsum("bd,sdn->sbn", x, w, preferred_element_type=jnp.float32
                                       ).sum(-1), out_shardings=out)
  return compile_or_not_fit(fn.lower(x, w))


def compile_programs(plan: RunPlan, p, mesh, scaled: bool) -> dict[str, Any]:
  """Each of the run's programs compiled for `mesh`'s devices (init, the first batch's init,
  the step) and the encoder product alone: name -> jax's Compiled."""
  rows = _abstract_rows(p, plan, scaled)
  return {
      "init": compile_or_not_fit(p.init.lower()),
      "init_from_first_batch": compile_or_not_fit(
          p.init_from_first_batch.lower(p.abstract_state, rows)),
      "step": compile_or_not_fit(p.step.lower(p.abstract_state, rows)),
      "encoder_product": _encoder_product(plan, mesh),
  }


def report(plan: RunPlan, compiled: dict[str, Any], where: str, devices,
           topology: Topology | None, num_tokens: int) -> Report:
  """The report of `compiled` (compile_programs') for `plan` on `devices`."""
  i = plan.identity
  programs = {name: program_cost(c) for name, c in compiled.items()}
  chip = topology.per_device if topology else None
  # What the run holds at once: its own programs' peaks (the product alone is a yardstick).
  peak = max(c.peak for name, c in programs.items() if name != "encoder_product")
  step, product = programs["step"], programs["encoder_product"]
  hosts = topology.num_hosts if topology else jax.process_count()
  fits = peak <= chip.hbm_bytes if chip else None
  step_s = product_s = bound = tps = hours = rows = None
  if chip:
    step_s, bound = roofline(step.flops, step.bytes_accessed, chip)
    # The product's floor is its flops: inside the step its [batch, latents] output need never
    # reach HBM (the top-k can consume it where it is made), so its bytes are not counted.
    product_s = product.flops / chip.bf16_flops
    tps = i.batch_size / step_s
    hours = plan.num_steps * step_s * len(devices) / topology.devices_per_chip / 3600
    rows = i.batch_size * plan.num_streams / step_s / hosts
  return Report(
      topology=where, device_kind=devices[0].device_kind, num_devices=len(devices),
      num_hosts=hosts, chip=dataclasses.asdict(chip) if chip else None,
      execution=plan.execution.describe(),
      shape=dict(arch=i.arch, seeds=len(i.seeds), d_in=i.d_in, num_latents=i.num_latents,
                 k=i.k, batch_size=i.batch_size, num_steps=plan.num_steps,
                 num_tokens=num_tokens),
      programs=programs, hbm_bytes=chip.hbm_bytes if chip else None, peak_bytes=peak,
      fits=fits, step_seconds=step_s, product_seconds=product_s, bound=bound,
      tokens_per_s_per_seed=tps, chip_hours=hours, rows_per_s_per_host=rows)


class DoesNotFit(Exception):
  """XLA's TPU compiler refused the program: what it needs per device against what it has."""

  def __init__(self, required: float, available: float | None, message: str):
    super().__init__(message)
    self.required, self.available = required, available


_OOM = re.compile(r"required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT])\)")


def compile_or_not_fit(lowered):
  """lowered.compile(), or DoesNotFit where the TPU compiler ran out of HBM (it refuses to
  build a program that would not fit, naming both sizes)."""
  try:
    return lowered.compile()
  except Exception as e:  # jax.errors.JaxRuntimeError, RESOURCE_EXHAUSTED
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    unit = lambda u: {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[u]
    m = _OOM.search(text)
    if m is None:
      raise DoesNotFit(float("nan"), None, text.splitlines()[0][:300]) from None
    raise DoesNotFit(float(m.group(2)) * unit(m.group(3)), float(m.group(4)) * unit(m.group(5)),
                     text.splitlines()[0][:300]) from None


def suggest(plan: RunPlan, one_per_device: dict[str, ProgramCost], hbm: float) -> str:
  """The most seeds, and the largest batch for `plan`'s seeds, that fit `hbm` per device, from
  the programs of the same run with one seed per device: the state grows with the seeds on a
  device, the temporaries with the seeds times the rows on a device (the [batch, latents]
  buffers), so both are read off that compile and scaled."""
  i, (seed_axis, data_axis) = plan.identity, plan.execution.mesh
  runs = {k: c for k, c in one_per_device.items() if k != "encoder_product"}
  peak = max(c.peak for c in runs.values())
  state = runs["step"].arguments
  temps = peak - state
  said = []
  if peak <= hbm:
    said.append(f"--num_seeds={int(hbm // peak) * seed_axis} at --batch_size={i.batch_size}")
  local = len(i.seeds) / seed_axis
  room = hbm / local - state
  quantum = data_axis * 256
  batch = int(i.batch_size * room / temps) // quantum * quantum if room > 0 and temps > 0 else 0
  if batch >= quantum:
    said.append(f"--batch_size={batch} with --num_seeds={len(i.seeds)}")
  return " or ".join(said) if said else ("not even one seed per device fits: a larger slice "
                                          "(more chips on the seed axis) or fewer latents")


def describe(r: Report) -> str:
  """The report as a person reads it: one device's memory against its HBM, then the step."""
  g = lambda b: f"{b / GB:.2f} GB"
  s = r.shape
  lines = [f"jaxsae compile report: {s['arch']} x{s['seeds']} seeds, d_in {s['d_in']}, "
           f"{s['num_latents']:,} latents, k {s['k']}, batch {s['batch_size']:,} on "
           f"{r.topology} ({r.num_devices} x {r.device_kind}, {r.num_hosts} host"
           f"{'s' if r.num_hosts > 1 else ''})",
           f"  plan: {r.execution}",
           f"  {'per device':22s} {'state':>9s} {'temporaries':>11s} {'peak':>9s} "
           f"{'flops':>9s} {'bytes':>11s}"]
  for name, c in r.programs.items():
    lines.append(f"  {name:22s} {g(c.arguments):>9s} {g(c.temporaries):>11s} {g(c.peak):>9s} "
                 f"{c.flops / 1e12:7.3f} T {c.bytes_accessed / GB:8.2f} GB")
  counted = sorted({t for c in r.programs.values() for t in c.custom_calls})
  if counted:
    lines.append(f"  (custom calls counted from their shapes: {', '.join(counted)})")
  if r.hbm_bytes:
    verdict = ("fits" if r.fits else "DOES NOT FIT") + (
        f": {g(r.peak_bytes)} of {g(r.hbm_bytes)} HBM per device "
        f"({r.peak_bytes / r.hbm_bytes:.0%})")
    lines.append(f"  memory: {verdict}")
    c = r.chip
    lines.append(
        f"  step by the roofline of {c['name']} ({c['bf16_flops'] / 1e12:.0f} TFLOP/s, "
        f"{c['hbm_bandwidth'] / GB:.0f} GB/s per device): {r.step_seconds * 1e3:.2f} ms, "
        f"{r.bound}-bound; the encoder product alone {r.product_seconds * 1e3:.2f} ms "
        f"({r.step_seconds / r.product_seconds:.1f}x)")
    xla = r.programs["step"].xla_seconds
    if xla:
      lines.append(f"  XLA's own estimate of the step: {xla * 1e3:.2f} ms")
    lines.append(f"  {r.tokens_per_s_per_seed:,.0f} tokens/s per seed; "
                 f"{s['num_tokens']:,} tokens: {r.chip_hours:,.1f} chip-hours "
                 f"({s['num_steps']:,} steps); each host must read "
                 f"{r.rows_per_s_per_host:,.0f} rows/s")
    lines.append("  (estimates from XLA's cost model and published peaks, not timings)")
  return "\n".join(lines)


def refusal(where: str, required: float, available: float, suggestion: str) -> JaxsaeError:
  return JaxsaeError(f"the run does not fit {where}: it needs {required / GB:.2f} GB per device "
                     f"of {available / GB:.2f} GB HBM; the largest that fits: {suggestion}")
