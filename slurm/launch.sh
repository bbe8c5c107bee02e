#!/usr/bin/env bash
# The one launcher behind every slurm/*.sh template (run as the batch script, on the first node).
#
# Knobs, from the environment or `sbatch --export=ALL,...`:
#   SCALING_PIPELINE, SCALING_STAGE  the pipeline YAML and stage to run (the template's defaults)
#   SCALING_CONFIG      a run config YAML instead of a pipeline stage
#   SCALING_OVERRIDES   space-separated overrides: pipeline keys for a stage
#                       (stages.pretrain.train.steps=10), run keys for SCALING_CONFIG (train.steps=10)
#   SCALING_OUTPUT      output folder: the pipeline's output_dir for a stage (default: the
#                       pipeline's own), the run's folder for SCALING_CONFIG (default runs/slurm/<job name>)
#   GPUS_PER_NODE       processes per node (default: the node's GPU count, else 8)
#   SCALING_PYTHON      the python that has scaling installed (default .venv/bin/python, else python3)
#   SCALING_GUARD_S     the wall-time guard: save and stop this many seconds before the job's end (300)
#
# Preemption: the templates ask for `--signal=B:USR1@<s> --requeue`; on USR1 this script writes
# <output>/STOP, every rank saves the same step and exits (scaling/train/signals.py), and the job
# requeues itself; the requeued job resumes from that checkpoint and the same MLflow run.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
die() { echo "slurm/launch.sh: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; submit a template with sbatch (e.g. sbatch slurm/pretrain_vitg.sh), or run 'scaling pipeline run' locally"
PY=${SCALING_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
read -r -a OVERRIDES <<< "${SCALING_OVERRIDES:-}"

# The run config every rank reads, validated here (before any rank starts) for NODES x GPUS ranks.
if [ -n "${SCALING_CONFIG:-}" ]; then
  [ -f "$SCALING_CONFIG" ] || die "SCALING_CONFIG '$SCALING_CONFIG' does not exist; pass a run config YAML"
  OUT=${SCALING_OUTPUT:-runs/slurm/${SLURM_JOB_NAME:-job}}
  mkdir -p "$OUT"
  CONFIG=$OUT/config.slurm.yaml
  cp "$SCALING_CONFIG" "$CONFIG"
  RUN_OVERRIDES=("${OVERRIDES[@]}" "train.output_dir=$OUT")
else
  [ -n "${SCALING_PIPELINE:-}" ] && [ -n "${SCALING_STAGE:-}" ] || die "set SCALING_PIPELINE and SCALING_STAGE, or SCALING_CONFIG"
  [ -f "$SCALING_PIPELINE" ] || die "SCALING_PIPELINE '$SCALING_PIPELINE' does not exist; pass one of pipelines/*.yaml"
  STAGE_ARGS=("$SCALING_PIPELINE" "$SCALING_STAGE" "ranks=$((NODES * GPUS))" ${SCALING_OUTPUT:+"output_dir=$SCALING_OUTPUT"} "${OVERRIDES[@]}")
  # The stage's folder, its resolved config (init_from: previous -> the previous stage's
  # export), and whether it finished already (a job requeued after it completed).
  read -r state OUT < <("$PY" -m scaling.cli pipeline prepare "${STAGE_ARGS[@]}" | tail -n 1) || true
  case "${state:-}" in
    done) echo "[slurm] stage $SCALING_STAGE finished earlier ($OUT); nothing to do"; exit 0 ;;
    run) CONFIG=$OUT/config.launch.yaml; RUN_OVERRIDES=() ;;
    *) die "could not prepare stage '$SCALING_STAGE' of $SCALING_PIPELINE (see the error above)" ;;
  esac
fi

# Wall-time guard: the ranks save and stop SCALING_GUARD_S before the job's end.
end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null || true)
if end_s=$(date -d "$end" +%s 2>/dev/null); then
  export SCALING_STOP_AT=$((end_s - ${SCALING_GUARD_S:-300}))
  echo "[slurm] wall-time guard: the ranks save and stop at $(date -u -d "@$SCALING_STOP_AT" +%FT%TZ) (job ends $end)"
fi

trap 'echo "[slurm] $(date -u +%FT%TZ) preemption/time-limit notice: asking the ranks to save and stop"; touch "$OUT/STOP"' USR1

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NODES node(s) x $GPUS ranks, head $HEAD:$PORT, output $OUT"
# One task per node, each a torchrun whose rendezvous (c10d on the head node) is keyed by the job id.
srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$PY" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$GPUS" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m scaling.cli train --config "$CONFIG" "${RUN_OVERRIDES[@]}" &
pid=$!
# `wait` returns early when the USR1 trap runs; keep waiting until srun itself has ended.
set +e
while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
set -e

if [ -f "$OUT/STOPPED" ]; then
  echo "[slurm] stopped early ($(cat "$OUT/STOPPED")); requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [ -z "${SCALING_CONFIG:-}" ]; then
  # A pipeline stage: export its weights for the next stage and record it (or mark the
  # pipeline's MLflow run failed). A failed stage's non-zero exit cancels the jobs after it.
  "$PY" -m scaling.cli pipeline complete "${STAGE_ARGS[@]}" --exit-code "$rc" || { [ "$rc" -ne 0 ] || rc=1; }
fi
exit "$rc"
