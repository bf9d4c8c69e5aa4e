"""Train S sparse autoencoders that differ only in their seed, on one stream of batches, at once.

  jaxsae train --store=DIR --arch=topk --num_latents=N --k=K --seeds=0,1,2,3 --out=RUN

The S seeds are one Flax ensemble (`nnx.vmap` over per-seed rngs), so every variable carries a
leading seed axis [S, ...]; one functional jitted step merges the modules, runs every seed's
loss, gradient and optax update and splits them again, on a Mesh with axes ("seed", "data")
that spreads seeds over one axis and the batch over the other. Defaults follow the recipe of the
paper's SAEs (EleutherAI sparsify, December 2024). One file per part, in the order a run uses
them:

  config.py       TrainConfig: the flags, one frozen dataclass
  plan.py         resolve(): the flags checked and turned into a RunPlan (its identity, which
                  run.json stores and a resume must match, and its execution on this machine)
  state.py        the ensemble's state (Member, TrainState), its shardings, the optimizer
  step.py         the jitted step: every seed's update, the --target_l0 controller
  programs.py     build(): the run's abstract state, shardings and jitted init and step, which
                  the loop and the benchmarks share; of_plan() keeps them for the process's
                  next run of the same shape (a resume, a study's rerun)
  checkpoints.py  orbax checkpoints with digests, restored exactly; a failed write in one line
  hooks.py        what runs after steps: metrics.jsonl, the clock, the hooks
  export.py       every seed to RUN/seed{N}/ in the layouts of --layouts
  loop.py         run(): all of the above, in order

Outputs under RUN/: run.json, checkpoints/ (rerunning the same command resumes from the newest
complete one), metrics.jsonl, and at the end seed{N}/ for every seed (cfg.json +
sae.safetensors, sparsify's layout, for TopK; cfg.json + sae_weights.safetensors, SAELens's, for
the rest; --layouts adds RUN/{layout}/seed{N}/) (plus tokens{T}/seed{N}/ for each --keep_at_tokens). With --data_seeds each seed
reads its own batch order and exports to seed{N}_data{D}/.
"""

from __future__ import annotations

from jaxsae.train.config import TrainConfig
from jaxsae.train.loop import run
from jaxsae.train.plan import RunPlan, make_mesh, member_names, resolve
from jaxsae.train.programs import Programs, build
from jaxsae.train.state import (TrainState, exported, init_from_first_batch, make_optimizer,
                                state_shardings)
from jaxsae.train.step import make_step

__all__ = ["Programs", "RunPlan", "TrainConfig", "TrainState", "build", "exported", "init_from_first_batch",
           "make_mesh", "make_optimizer", "make_step", "member_names", "resolve", "run",
           "state_shardings"]
