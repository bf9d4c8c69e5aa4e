#!/usr/bin/env bash
# The hand-off from extraction (PyTorch, on a GPU or CPU machine) to training on a TPU slice:
# extract into a local store, then copy it into the bucket that launch/tpu.sh trains from.
#
#   BUCKET=gs://my-bucket MODEL=EleutherAI/pythia-160m SITES=gpt_neox.layers.6.mlp \
#     DATASET=monology/pile-uncopyrighted TOKENS=1000000000 launch/extract_to_gcs.sh
#
# Large extractions split over machines with --shard_range (WORKERS=N WORKER=i): each worker
# writes its shards; the store is complete when every shard's ledger entry is there, and the
# worker that writes the last one writes manifest.json. Rerunning resumes a killed worker.
set -euo pipefail
: "${BUCKET:?gs:// bucket}"
MODEL=${MODEL:-smollm2}; SITES=${SITES:-middle}; DATASET=${DATASET:-default}
TOKENS=${TOKENS:-10000000}; CTX=${CTX:-1024}; NAME=${NAME:-default}
LOCAL=${LOCAL:-out/stores/$NAME}
cd "$(dirname "$0")/.."
# DRY_RUN=1 prints every command that would change something instead of running it.
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
run make install TORCH="${TORCH:-torch}"   # on a GPU machine the CUDA build of torch is the point
RANGE=()
if [ -n "${WORKERS:-}" ]; then
  NW=$(( (TOKENS + CTX - 1) / CTX )); WPS=$(( 65536 / CTX ))   # as jaxsae extract counts
  SHARDS=$(( (NW + WPS - 1) / WPS ))
  A=$(( SHARDS * WORKER / WORKERS )); B=$(( SHARDS * (WORKER + 1) / WORKERS ))
  RANGE=(--shard_range="$A:$B")
fi
run .venv/bin/jaxsae extract --model="$MODEL" --sites="$SITES" --dataset="$DATASET" \
  --num_tokens="$TOKENS" --ctx_len="$CTX" --dtype=bfloat16 --out="$LOCAL" "${RANGE[@]}"
# Shards and ledgers first, manifest last: a reader never sees a manifest before its shards.
run gcloud storage rsync -r -x 'manifest\.json$' "$LOCAL" "$BUCKET/stores/$NAME"
if [ -n "${DRY_RUN:-}" ] || [ -f "$LOCAL/manifest.json" ]; then
  run gcloud storage cp "$LOCAL/manifest.json" "$BUCKET/stores/$NAME/manifest.json"
fi
