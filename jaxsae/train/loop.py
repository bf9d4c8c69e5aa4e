"""The run: the plan, the state (fresh or restored), the batches, the jitted step, the hooks."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
from flax import nnx

from jaxsae import files
from jaxsae import store as store_lib
from jaxsae import tpu
from jaxsae.errors import JaxsaeError
from jaxsae.train import checkpoints, compile_report
from jaxsae.train.config import TrainConfig
from jaxsae.train.export import export
from jaxsae.train.hooks import Hook, MetricsWriter, Throughput, Tick
from jaxsae.train.plan import RunPlan, check_run_dir, make_mesh, resolve
from jaxsae.train.programs import Programs, of_plan
from jaxsae.train.state import make_optimizer


def run(cfg: TrainConfig, *, interrupt_at: int | None = None) -> None:
  """Trains (or resumes) the run; `interrupt_at` stops after that step as a kill would (tests)."""
  if cfg.distributed:
    jax.distributed.initialize(cfg.coordinator_address or None, cfg.num_processes,
                               cfg.process_id)
  if not cfg.store or not cfg.out:
    raise JaxsaeError("--store and --out are required")
  store = store_lib.Store(cfg.store, window=cfg.store_window)
  site = store.sites[store.site_index(cfg.site)]
  if (massive := store.massive_warning(site)) and jax.process_index() == 0:
    print(massive, flush=True)  # before the first step: the store's outliers shape the run
  topology = tpu.topology(cfg.topology) if cfg.topology else None
  # Off the slice it names, a topology's run can only be compiled.
  elsewhere = topology is not None and (jax.default_backend() != "tpu" or
                                        jax.device_count() != len(topology.devices))
  plan = resolve(cfg, store.d_in, store.num_tokens, topology.devices if elsewhere else None)
  input_scale = store.normalizer(site) if plan.identity.normalize else 1.0
  mesh = make_mesh(plan, topology.devices if elsewhere else None)
  schedule = make_optimizer(plan)[1]  # the programs' own optimizer; this one for the logs
  p = of_plan(plan, mesh, scaled=store.scaled, input_scale=input_scale)
  if cfg.compile_only or elsewhere or plan.execution.backend == "tpu":
    # Before anything is written: a run that would not fit is refused here.
    _compile_report(cfg, plan, p, mesh, store, topology, write=cfg.compile_only or elsewhere)
    if cfg.compile_only or elsewhere:
      return
  check_run_dir(plan)
  if jax.process_index() == 0:
    print(f"jaxsae train: {plan.identity.arch} x{len(plan.seeds)} on "
          f"{plan.execution.describe()}", flush=True)
  graphdef = p.graphdef
  state, mngr, fresh = _initial_state(plan, p)
  start = int(state["step"].get_value())
  # The architecture's static facts, for export, from the abstract state: no array of the
  # initial state outlives the step that donates it.
  sae = nnx.merge(graphdef, p.abstract_state).seeds.sae
  clock = Throughput(plan.identity.batch_size, len(plan.seeds), plan.num_streams)
  hooks, writer, bar = _hooks(plan, mngr, schedule, start, clock, lambda directory, t: export(
      directory, graphdef, t.state, sae, plan, t.step, input_scale))
  skipped = 0 if fresh else checkpoints.saved_metadata(mngr, start).get(checkpoints.SKIPPED_KEY, 0)
  failed = True
  try:
    for step, batch in enumerate(_batches(plan, store, p.batch_sharding.codes, start, clock),
                                 start + 1):
      if fresh and step == 1:
        state = p.init_from_first_batch(state, batch.x)
      state, metrics = p.step(state, batch.x)
      if batch.skipped and not skipped:
        logging.warning("skipping rows with NaN/Inf (--skip_non_finite); the first: %s",
                        batch.where)
      skipped += batch.skipped
      tick = Tick(step, state, metrics, skipped)
      for hook in hooks:
        hook(tick)
      if interrupt_at is not None and step >= interrupt_at:
        raise KeyboardInterrupt
    with checkpoints.writing(mngr):
      mngr.wait_until_finished()
    export(plan.out, graphdef, state, sae, plan, plan.num_steps, input_scale)
    _say_done(plan, skipped)
    failed = False
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    checkpoints.close(mngr, raise_errors=not failed)  # else the error on its way out is told


def _compile_report(cfg: TrainConfig, plan: RunPlan, p: Programs, mesh, store, topology,
                    write: bool) -> None:
  """Compiles the run's programs for its devices (a topology's, or this TPU slice's), prints
  the report, writes it to RUN/compile_report.json where `write`, and refuses a run that would
  not fit in one line naming the most seeds and the largest batch that would."""
  devices = list(mesh.devices.flat)
  where = topology.name if topology else f"this machine's {len(devices)} {jax.default_backend()}"
  if topology is None and plan.execution.backend == "tpu":
    topology = tpu.of_devices(f"this {devices[0].device_kind} slice", devices)
  if jax.process_index() == 0:
    print(f"jaxsae train: compiling for {where} ({plan.execution.describe()}) ...", flush=True)
  tokens = plan.num_steps * plan.identity.batch_size
  try:
    compiled = compile_report.compile_programs(plan, p, mesh, store.scaled)
  except compile_report.DoesNotFit as e:
    # The TPU compiler refuses what would not fit; the same run with one seed per device says
    # what one seed needs, and so how many would fit.
    one = dataclasses.replace(cfg, num_seeds=None, seeds=tuple(plan.seeds[:plan.execution.mesh[0]]),
                              data_seeds=())
    small = resolve(one, store.d_in, store.num_tokens, devices)
    q = of_plan(small, mesh, scaled=store.scaled)
    costs = {k: compile_report.program_cost(c) for k, c in
             compile_report.compile_programs(small, q, mesh, store.scaled).items()}
    available = e.available or (topology.per_device.hbm_bytes if topology else float("nan"))
    raise compile_report.refusal(where, e.required, available,
                                 compile_report.suggest(plan, costs, available))
  r = compile_report.report(plan, compiled, where, devices, topology, tokens)
  if jax.process_index() == 0:
    print(compile_report.describe(r), flush=True)
    if write:
      files.makedirs(plan.out)
      path = os.path.join(plan.out, compile_report.REPORT_FILE)
      files.atomic_write_json(path, r.to_json())
      print(f"jaxsae train: compile report in {path}", flush=True)
  if r.fits is False:  # the compiler's HBM is a little under the chip's: this rarely fires
    raise compile_report.refusal(where, r.peak_bytes, r.hbm_bytes, "fewer seeds or a smaller "
                                 "batch")


def _initial_state(plan: RunPlan, p: Programs):
  """(state, manager, fresh): the state built directly into its sharding, or restored from the
  newest checkpoint. Past this point the loop holds only the state's arrays (nnx.State);
  modules live inside jit."""
  mngr = checkpoints.checkpoint_manager(plan.checkpoints)
  state = checkpoints.restore_latest(mngr, p.abstract_state)
  fresh = state is None
  if fresh:
    state = p.init()
  return state, mngr, fresh


def _batches(plan: RunPlan, store: store_lib.Store, sharding, start: int, clock: Throughput):
  """The run's batches as stored (the step decodes and normalizes them), each step's wait for
  its batch told to the clock: where the hosts, not the devices, set the pace."""
  read = dict(start_step=start, num_steps=plan.num_steps - start, site=plan.identity.site,
              skip_non_finite=plan.skip_non_finite, stored=True)
  if plan.identity.data_seeds:
    stream = store_lib.member_batches(plan.store_path, plan.identity.data_seeds,
                                      plan.identity.batch_size, sharding,
                                      window=plan.store_window, **read)
  else:
    stream = store.batches(plan.identity.batch_size, sharding=sharding,
                           data_seed=plan.identity.data_seed, **read)
  try:
    while True:
      t = time.perf_counter()
      batch = next(stream, None)
      if batch is None:
        return
      clock.waited(time.perf_counter() - t)
      yield batch
  finally:
    stream.close()  # stops its reader threads now, not when it is collected


def _hooks(plan: RunPlan, mngr, schedule, start: int, clock: Throughput, export_to):
  """(hooks, metrics writer, progress bar): the clock, metrics and the bar every --log_every
  steps, checkpoints every --checkpoint_every, snapshots at --keep_at_tokens, each at the end."""
  i, num_steps = plan.identity, plan.num_steps
  writer = MetricsWriter(plan.out, plan.member_names, start)
  bar = None
  if plan.progress and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True,
               desc=f"train {i.arch} x{len(i.seeds)}")

  def log(t: Tick) -> None:
    m = checkpoints.to_host(t.metrics)
    checkpoints.stop_if_bad(t.state, plan, mngr)
    rates = clock.rates(t.step)
    writer.write({"step": t.step, "tokens_per_seed": t.step * i.batch_size,
                  "non_finite_skipped": t.skipped, "lr": float(schedule(t.step - 1)), **rates,
                  "seeds": list(i.seeds), **({"data_seeds": list(i.data_seeds)}
                                             if i.data_seeds else {}),
                  **{k: v.tolist() for k, v in m.items()}})
    if bar is not None:
      bar.set_postfix({"stream tok/s": f"{rates['tokens_per_s_stream']:,.0f}",
                       "input wait": f"{rates['input_wait_frac']:.0%}",
                       "per seed": f"{rates['tokens_per_s_per_seed']:,.0f}",
                       "fvu": f"{m['fvu'].mean():.4f}", "l0": f"{m['l0'].mean():.1f}"},
                      refresh=False)

  def checkpoint(t: Tick) -> None:
    checkpoints.stop_if_bad(t.state, plan, mngr)
    checkpoints.save(mngr, t.state, t.skipped)

  keep = frozenset(plan.checkpoints.keep_steps)
  hooks = [
      clock.tick,
      Hook(log, every=plan.log_every, at=frozenset({num_steps})),
      Hook(checkpoint, every=plan.checkpoints.every, at=keep | {num_steps}),
      Hook(lambda t: export_to(os.path.join(plan.out, f"tokens{t.step * i.batch_size}"), t),
           at=keep),
  ]
  if bar is not None:
    hooks.append(lambda t: bar.update(1))
  return hooks, writer, bar


def _say_done(plan: RunPlan, skipped: int) -> None:
  if jax.process_index() != 0:
    return
  seeds, names = plan.seeds, plan.member_names
  where = ("{" + ",".join(names) + "}" if plan.identity.data_seeds else
           "seed{" + ",".join(map(str, seeds)) + "}")
  print(f"jaxsae train: {len(seeds)} seeds x {plan.num_steps * plan.identity.batch_size:,} "
        f"tokens; SAEs in {os.path.join(plan.out, where)}/, metrics in "
        f"{os.path.join(plan.out, 'metrics.jsonl')}"
        + (f"; skipped {skipped} rows with NaN/Inf" if skipped else ""))
