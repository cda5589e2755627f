#!/usr/bin/env bash
# Preprocess and score a whole cohort as a SLURM array: each task takes one shard of the
# subjects (uadct reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT itself), finished
# subjects are skipped on a re-run, and a bad scan fails only itself (exit code 1, listed
# in the JSON summary).
#
#   sbatch --array=0-49 examples/slurm_array.sh /data/cohort/scans /data/uadct model.pt
#
#SBATCH --job-name=uadct
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
set -euo pipefail
scans=${1:?folder of NIfTI scans}
work=${2:?output folder}
model=${3:-}

status=0
uadct preprocess "$scans" -o "$work/prep" --json > "$work/preprocess.${SLURM_ARRAY_TASK_ID:-0}.json" || status=$?
if [ -n "$model" ]; then
  # scores this task's shard of the prepared subjects; maps land on each scan's own grid
  uadct score "$model" "$work/prep" -o "$work/maps/" --brain-mask-out "$work/brain_masks/" --json \
    > "$work/score.${SLURM_ARRAY_TASK_ID:-0}.json" || status=$?
fi
exit "$status"
