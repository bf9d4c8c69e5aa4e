#!/usr/bin/env bash
# Multi-seed batches on one machine with one or more NVIDIA GPUs.
#
#   launch/gpu.sh --store=out/stores/default --arch=topk --num_seeds=8 --num_latents=32768 --out=out/run
#
# Installs the CUDA build of JAX (and of torch, for extraction) into .venv, then trains. Seeds
# are spread over the GPUs on the mesh's "seed" axis (--mesh=auto), the batch over "data".
set -euo pipefail
cd "$(dirname "$0")/.."
# DRY_RUN=1 prints the commands instead of running them.
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
run make install TORCH=torch
run .venv/bin/python -m pip install -q -e '.[cuda]'
# Let XLA take GPU memory as it needs it rather than 75% up front, so extraction (torch) and
# training can share a card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
run .venv/bin/jaxsae train "$@"
