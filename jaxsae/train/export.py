"""Every seed of a run to RUN/seed{N}/ (or seed{N}_data{D}/) in the plan's first layout, and to
RUN/{layout}/seed{N}/ in each other (jaxsae.formats says which library reads which)."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from jaxsae import formats
from jaxsae.sae import SAE
from jaxsae.train.checkpoints import to_host
from jaxsae.train.plan import RunPlan
from jaxsae.train.state import exported


def export(directory: str, graphdef: nnx.GraphDef, state: nnx.State, sae: SAE, plan: RunPlan,
           step: int, input_scale: float) -> None:
  """Every member of `state` at `step` under `directory` (process 0 writes); `sae` is the
  architecture's module, for the facts cfg.json records of it."""
  saes = to_host(exported(graphdef, state))
  extras = [{}] * len(plan.seeds)
  if plan.l0_target is not None:  # the coefficient each seed ended at, and what it was asked for
    mult = to_host(state["seeds"]["penalty_mult"].get_value())
    extras = [{"target_l0": plan.l0_target.target, "penalty_mult": float(v),
               "penalty_coeff": float(plan.penalty_coeff * v)} for v in mult]
  if jax.process_index() != 0:
    return
  i = plan.identity
  for m, (seed, data_seed, member) in enumerate(zip(plan.seeds, plan.member_data_seeds,
                                                     plan.member_names)):
    cfg = {"arch": i.arch, "seed": seed, "k": i.k, "step": step,
           "num_tokens": step * i.batch_size, "store": plan.store_path, "site": i.site,
           "data_seed": data_seed, **extras[m],
           "input_scale": input_scale,
           "normalize_decoder": sae.unit_norm_decoder,
           "apply_b_dec_to_input": sae.subtracts_b_dec, **sae.export_cfg()}
    params = {name: np.asarray(v[m]) for name, v in saes.items()}
    for j, layout in enumerate(plan.layouts):
      where = directory if j == 0 else os.path.join(directory, layout)
      formats.WRITERS[layout](os.path.join(where, member), params, cfg)
