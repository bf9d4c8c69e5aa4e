"""The flags of `jaxsae train`, as one frozen dataclass (cli.py makes one absl flag per field).

Nothing past `plan.resolve` reads a TrainConfig: it is what the user asked for, the RunPlan what
the run does.
"""

from __future__ import annotations

import dataclasses

from jaxsae.config import field
from jaxsae.sae import ARCHITECTURES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Flags of `jaxsae train` (cli.py makes one absl flag per field)."""

  store: str = field("", "Activation store directory (from `jaxsae extract`), local or gs://.")
  out: str = field("", "Run directory: checkpoints, metrics and the exported SAEs go here; "
                   "rerunning the same command resumes the run.")
  arch: str = field("topk", "SAE architecture: " + "|".join(ARCHITECTURES) + ".")
  num_latents: int | None = field(None, "Latents per SAE; default 32 * d_in (sparsify's "
                                  "expansion factor).")
  k: int = field(32, "Active latents per token for topk (per token on average for batchtopk).")
  seeds: tuple[int, ...] = field((0, 1, 2, 3), "SAE seeds; each changes only the parameter "
                                 "initialisation. All seeds see the identical batches unless "
                                 "--data_seeds is given.")
  num_seeds: int | None = field(None, "Shorthand for --seeds=0,1,...,num_seeds-1.")
  data_seed: int = field(0, "Seed of the batch order, shared by all SAE seeds.")
  data_seeds: tuple[int, ...] = field((), "One batch-order seed per SAE seed (as many as "
                                      "--seeds), so each member trains on its own stream; seeds "
                                      "may then repeat (--seeds=0,0 --data_seeds=0,1: one "
                                      "initialisation, two data orders). Exports go to "
                                      "seed{S}_data{D}/. Default: one stream (--data_seed) for "
                                      "all.")
  site: str | None = field(None, "Which of the store's sites to train on; default the first.")
  skip_non_finite: bool = field(False, "Skip store rows holding NaN/Inf (each gives its place in "
                                "the batch to a finite row of the same batch) and count them in "
                                "metrics.jsonl, instead of stopping with an error naming the row.")
  num_tokens: int | None = field(None, "Training tokens per seed; default one pass over the store.")
  batch_size: int = field(16384, "Tokens per batch (global, over all hosts and devices).")
  lr: float | None = field(None, "Adam learning rate; default 2e-4 / sqrt(num_latents / 2**14) "
                           "(sparsify).")
  lr_warmup_steps: int = field(1000, "Linear learning-rate warmup steps, then linear decay to 0.")
  adam_b1: float = field(0.9, "Adam beta1.")
  adam_b2: float = field(0.999, "Adam beta2.")
  max_grad_norm: float = field(1.0, "Gradient-norm clip, applied to each seed separately; 0 = off.")
  auxk_alpha: float = field(0.0, "Weight of the AuxK dead-latent loss (topk, batchtopk); 1/32 = "
                            "0.03125 turns it on as in Gao et al.; 0 = off as in the paper's runs.")
  dead_tokens: int = field(10_000_000, "A latent is dead after not firing for this many tokens.")
  matryoshka_widths: tuple[int, ...] = field((), "matryoshka: widths of the nested prefixes "
                                             "whose reconstruction losses are summed, strictly "
                                             "increasing, num_latents last (appended if left "
                                             "out); default the doubling n/16,n/8,n/4,n/2,n.")
  l1_coeff: float = field(5.0, "L1 coefficient (relu_l1, relu_l1_unitnorm, gated), for inputs "
                          "normalised to mean norm sqrt(d_in).")
  l0_coeff: float = field(1e-3, "L0 coefficient of jumprelu, in FVU per active latent per token.")
  penalty_warmup: float = field(0.05, "Fraction of the steps over which the L1/L0 coefficient "
                                "warms up linearly from 0.")
  target_l0: float | None = field(None, "Adapt each seed's L1/L0 coefficient during training so "
                                  "its L0 (active latents per token) ends near this (relu_l1, "
                                  "relu_l1_unitnorm, gated, jumprelu); the multiplier is logged "
                                  "as penalty_mult. Default off: the fixed --l1_coeff/--l0_coeff.")
  target_l0_gain: float = field(0.02, "With --target_l0: the controller's integral gain: per "
                                "step, the coefficient's log moves by this times the step's "
                                "log((L0 + 1) / (target + 1)).")
  target_l0_prop: float | None = field(None, "With --target_l0: the controller's proportional "
                                       "gain: the coefficient's log also follows this times "
                                       "that error (averaged over ~10 steps). Default 1, and 5 "
                                       "for jumprelu, whose L0 follows the coefficient more "
                                       "slowly.")
  target_l0_freeze: float = field(0.1, "With --target_l0: fraction of the steps at the end "
                                  "that train at the coefficient then reached, held fixed (the "
                                  "L0 drifts as the learning rate decays: over the last 20% the "
                                  "demo's relu_l1 went from 32 to 36).")
  jumprelu_bandwidth: float = field(1e-3, "JumpReLU pseudo-derivative bandwidth (as published; "
                                    "scaled by sqrt(d_in) for jaxsae's normalisation).")
  jumprelu_threshold: float | None = field(None, "JumpReLU initial threshold (as published, "
                                           "1e-3; scaled by sqrt(d_in)). With --target_l0 the "
                                           "default starts each latent's threshold where it "
                                           "fires target / num_latents of the first batch.")
  normalize: bool | None = field(None, "Scale inputs to mean norm sqrt(d_in) with the store's "
                                 "recorded mean norm; default on for relu_l1/gated/jumprelu, off "
                                 "for topk/batchtopk (whose FVU loss is scale-free).")
  mesh: str = field("auto", "Device mesh SEEDSxDATA, e.g. 4x2; auto spreads seeds first.")
  seed_loop: str = field("auto", "vmap (all seeds as one batched program) or map (one seed after "
                         "another inside the step); auto: map on a single CPU device, else vmap.")
  topk_backward: str = field("auto", "TopK's top-k and sparse backward: kernel (jaxsae's C++ "
                             "CPU kernels: one CPU device, float32), dense (matrix products over "
                             "[batch, num_latents]) or scatter (XLA's scatter-adds of the k "
                             "rows); auto: kernel where it runs, else dense while batch x "
                             "num_latents <= 2^22, where it is faster (bench/bench_kernels.py). "
                             "The same numbers to float tolerance; scatter reproduces jaxsae "
                             "0.1's bit for bit. mxu (TPU's auto): every k-sparse product "
                             "a dense product on the MXU.")
  topk_rule: str = field("auto", "Which top-k selects TopK's latents: exact (jax.lax.top_k's "
                         "set), approx (TPU's approx_max_k at recall target 0.95: fused into the "
                         "encoder product on a TPU; elsewhere XLA computes it exactly) or "
                         "approx_cpu (the TPU's algorithm emulated, to measure its effect off a "
                         "TPU). auto: approx on TPU, exact elsewhere. The run prints and "
                         "records which.")
  compute_dtype: str = field("auto", "dtype of the matrix products (float32|bfloat16); "
                             "parameters and optimizer state stay float32. auto: float32 on "
                             "CPU, else bfloat16.")
  checkpoint_every: int = field(1000, "Save a checkpoint every this many steps (and at the end).")
  keep_checkpoints: int = field(3, "How many of the newest checkpoints to keep.")
  checkpoint_dir: str = field("", "Where checkpoints go; default RUN/checkpoints. May be gs://, so "
                              "a preempted TPU slice resumes from the bucket while --out stays "
                              "on local disk.")
  keep_at_tokens: tuple[int, ...] = field((), "Also keep checkpoints and export every seed (under "
                                          "RUN/tokens{T}/) at these token counts.")
  layouts: tuple[str, ...] = field((), "The layouts every seed is exported in (sparsify, saelens), "
                                   "each only where that library encodes the SAE as jaxsae "
                                   "does: the first at RUN/seed{N}/, the others at "
                                   "RUN/{layout}/seed{N}/. Default: sparsify for topk, saelens "
                                   "for every other architecture (sparsify encodes TopK only).")
  store_window: int = field(8, "gs:// stores: shards held in memory at once, the shuffle buffer "
                            "being read (4 shards) and those read ahead of it (at least 8, "
                            "since a batch can straddle two buffers). Memory: this times the "
                            "store's shard size; a local store is memory-mapped instead.")
  topology: str = field("", "Compile the run for this Cloud TPU slice (v5e:2x4, v4:2x2x1, "
                        "v6e:4x4, v5e:16x16: GENERATION:AxB[xC]) with XLA's TPU compiler, on any "
                        "machine (libtpu installed, no TPU needed), and report per chip: memory "
                        "against HBM, flops, bytes, the step's roofline time, tokens/s, "
                        "chip-hours. Off the slice itself it implies --compile_only.")
  compile_only: bool = field(False, "Compile the run's programs, print the compile report, write "
                             "it to RUN/compile_report.json and stop. A run that would not fit "
                             "its devices' memory is refused either way (on a TPU, before "
                             "training starts).")
  log_every: int = field(10, "Write metrics every this many steps.")
  progress: bool = field(True, "Show a progress bar.")
  distributed: bool = field(False, "Join the other hosts with jax.distributed.initialize() first "
                            "(multi-host TPU: every worker runs the same command).")
  coordinator_address: str = field("", "host:port of process 0, with --distributed where the "
                                   "cluster is not detected (Cloud TPU and SLURM are); also "
                                   "$JAX_COORDINATOR_ADDRESS.")
  num_processes: int | None = field(None, "Number of processes, with --coordinator_address.")
  process_id: int | None = field(None, "This process's index, with --coordinator_address.")
