#!/usr/bin/env bash
# Train on several GPUs with torchrun. Every process runs the same `uadct train` command:
# each takes its slice of every global batch (--batch-size is the global batch), gradients
# are averaged over processes, and only rank 0 writes model.pt, its history and the
# resume file. Re-running the same command after a crash or preemption resumes.
#
# One node, all its GPUs:
#   bash examples/torchrun.sh prep/ model.pt
# SLURM, several nodes (one torchrun per node, it starts one process per GPU):
#   sbatch --nodes=2 examples/torchrun.sh prep/ model.pt
#
#SBATCH --job-name=uadct-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
set -euo pipefail
prep=${1:?folder written by uadct preprocess}
model=${2:?checkpoint to write, e.g. model.pt}
shift 2
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
gpus=${gpus:-1}; [ "$gpus" -ge 1 ] || gpus=1
args=(-m uadct train "$prep" -o "$model" --model ganomaly --batch-size 512 --augment flip,gmm "$@")

if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
  # multi-node: the first node of the allocation hosts the rendezvous
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  srun torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$gpus" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:29500" "${args[@]}"
else
  torchrun --standalone --nproc_per_node "$gpus" "${args[@]}"
fi
