#!/usr/bin/env bash
# Train many SAE seeds on a Cloud TPU slice, every worker running the same flagfile.
#
#   TPU=jaxsae-v4 ZONE=us-central2-b TYPE=v4-32 BUCKET=gs://my-bucket \
#     FLAGFILE=launch/paper_topk.flags launch/tpu.sh
#
# It first compiles the run for the slice on this machine (`pip install -e '.[tpu]'` here:
# libtpu, no TPU) and stops if the run would not fit the chips (step 0).
#
# The activation store must already be in the bucket (see launch/extract_to_gcs.sh: extraction
# runs on a GPU or CPU machine, once). Checkpoints go to the bucket (--checkpoint_dir), so a
# preempted spot slice picks up where it stopped: rerunning this script recreates the slice
# and the same command resumes from the newest complete checkpoint. The run's small files
# (run.json, metrics, the exported SAEs) are written on worker 0 and copied to the bucket.
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?zone}" "${BUCKET:?gs:// bucket}" "${FLAGFILE:?flagfile}"
TYPE=${TYPE:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
NAME=$(basename "$FLAGFILE" .flags)
RUN=${RUN:-$BUCKET/runs/$NAME}
STORE=${STORE:-$BUCKET/stores/default}
SPOT=${SPOT:---spot}
cd "$(dirname "$0")/.."
# DRY_RUN=1 prints every command that would change something instead of running it.
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
[ -f "$FLAGFILE" ] || { echo "no flagfile $FLAGFILE" >&2; exit 2; }

# 0. Compile first, here, for the slice's topology (libtpu's TPU compiler; no TPU needed): the
#    report (memory per chip against HBM, the step's roofline time, chip-hours) lands in
#    $REPORT, and a run that would not fit stops here, naming what would, before any TPU VM
#    exists. TOPOLOGY defaults from TYPE for the common slices; SKIP_COMPILE=1 skips this.
topology_of() {
  case "$1" in
    v4-8) echo v4:2x2x1 ;; v4-16) echo v4:2x2x2 ;; v4-32) echo v4:2x2x4 ;;
    v4-64) echo v4:2x4x4 ;; v4-128) echo v4:4x4x4 ;;
    v5litepod-4|v5e-4) echo v5e:2x2 ;; v5litepod-8|v5e-8) echo v5e:2x4 ;;
    v5litepod-16|v5e-16) echo v5e:4x4 ;; v5litepod-32|v5e-32) echo v5e:4x8 ;;
    v5litepod-64|v5e-64) echo v5e:8x8 ;; v5litepod-256|v5e-256) echo v5e:16x16 ;;
    v5p-8) echo v5p:2x2x1 ;; v5p-16) echo v5p:2x2x2 ;; v5p-32) echo v5p:2x2x4 ;;
    v6e-4) echo v6e:2x2 ;; v6e-8) echo v6e:2x4 ;; v6e-16) echo v6e:4x4 ;;
    v6e-64) echo v6e:8x8 ;; v6e-256) echo v6e:16x16 ;;
    *) echo "" ;;
  esac
}
TOPOLOGY=${TOPOLOGY:-$(topology_of "$TYPE")}
REPORT=${REPORT:-out/compile/$NAME-$TYPE}
if [ -z "${SKIP_COMPILE:-}" ]; then
  [ -n "$TOPOLOGY" ] || { echo "no topology known for TYPE=$TYPE: set TOPOLOGY=GEN:AxB[xC]" \
                            "(e.g. v5e:4x4), or SKIP_COMPILE=1" >&2; exit 2; }
  JAXSAE=${JAXSAE:-$(command -v jaxsae || echo .venv/bin/jaxsae)}
  run "$JAXSAE" train --flagfile="$FLAGFILE" --store="$STORE" --out="$REPORT" \
    --topology="$TOPOLOGY" --compile_only
fi

# 1. A queued resource: the request waits for capacity instead of failing.
if [ -n "${DRY_RUN:-}" ] || ! gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" \
     >/dev/null 2>&1; then
  run gcloud compute tpus queued-resources create "$TPU-qr" --node-id="$TPU" --zone="$ZONE" \
    --accelerator-type="$TYPE" --runtime-version="$VERSION" $SPOT
  until [ -n "${DRY_RUN:-}" ] || [ "$(gcloud compute tpus queued-resources describe "$TPU-qr" \
          --zone="$ZONE" --format='value(state.state)')" = ACTIVE ]; do
    echo "waiting for $TPU ($TYPE) ..."; sleep 30
  done
fi

# 2. The same jaxsae on every worker: this checkout, packed and copied, installed with the
#    TPU build of JAX and the gs:// filesystem layer. Training does not use torch, but the
#    package depends on it: the CPU build keeps several GB of CUDA off the workers.
run tar czf /tmp/jaxsae-src.tgz --exclude=.venv --exclude=out --exclude=.git .
run gcloud compute tpus tpu-vm scp /tmp/jaxsae-src.tgz "$FLAGFILE" "$TPU":~/ --worker=all \
  --zone="$ZONE"
run gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" --command="
  set -e; mkdir -p jaxsae && tar xzf jaxsae-src.tgz -C jaxsae
  python3 -m pip install -q --upgrade pip
  python3 -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  python3 -m pip install -q -e './jaxsae[tpu,gcs]'"

# 3. Every worker runs the same command; jax.distributed.initialize() (--distributed) joins
#    them into one program (Cloud TPU workers find each other themselves), and each host
#    reads only the rows of every global batch that its own chips hold.
run gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" --command="
  cd jaxsae && ~/.local/bin/jaxsae train --flagfile=\$HOME/$(basename "$FLAGFILE") \
    --store=$STORE --out=\$HOME/runs/$NAME --checkpoint_dir=$RUN/checkpoints --distributed"
run gcloud compute tpus tpu-vm ssh "$TPU" --worker=0 --zone="$ZONE" --command="
  gcloud storage rsync -r \$HOME/runs/$NAME $RUN"

echo "SAEs in $RUN/seed*/; match them anywhere with: jaxsae match $RUN --out=match"
