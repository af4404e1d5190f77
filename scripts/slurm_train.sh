#!/bin/bash
# Multi-node flame training on Slurm: one torchrun agent per node (srun), meeting at a c10d
# rendezvous on the first node; every agent starts one process per GPU.
#
#   sbatch --nodes 4 scripts/slurm_train.sh run.toml /shared/runs/exp1 [--section.key value ...]
#
# RUN_DIR must be on a filesystem every node sees (NFS, Lustre, GPFS...): all ranks write their
# checkpoint shards into it and rank 0 writes the metrics and the COMPLETE marker. Submitting the
# same command again (or `--requeue`) resumes from the newest complete checkpoint, on any number
# of nodes: the global batch is kept by adjusting train.grad_accum (a clear error if it cannot).
#
# Environment (optional):
#   FLAME_PYTHON          the Python with flame installed      (default: python3 on PATH)
#   FLAME_NPROC_PER_NODE  processes per node                   (default: the node's GPUs, else 1)
#   FLAME_RDZV_PORT       rendezvous port on the first node    (default: 29500)
#
#SBATCH --job-name=flame
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# SIGTERM 5 minutes before the time limit: flame finishes the step, checkpoints and exits cleanly
# (torchrun forwards the signal to its workers).
#SBATCH --signal=TERM@300

set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: sbatch [--nodes N] $0 CONFIG.toml RUN_DIR [--section.key value ...]" >&2
    exit 2
fi
CONFIG=$1
RUN_DIR=$2
shift 2
if [ ! -f "$CONFIG" ]; then
    echo "error: no such config file '$CONFIG'" >&2
    exit 2
fi

PY=${FLAME_PYTHON:-python3}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [ -n "${FLAME_NPROC_PER_NODE:-}" ]; then
    NPROC=$FLAME_NPROC_PER_NODE
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    NPROC=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi > /dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
else
    NPROC=1
fi
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${FLAME_RDZV_PORT:-29500}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# export NCCL_SOCKET_IFNAME=ib0   # the interface the nodes talk over, if NCCL picks the wrong one
# export NCCL_DEBUG=WARN

mkdir -p "$RUN_DIR"
echo "flame: $NNODES node(s) x $NPROC process(es), rendezvous $HEAD:$PORT, run dir $RUN_DIR"

# One task per node; `--kill-on-bad-exit` stops the other agents when one fails.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc_per_node="$NPROC" \
    --rdzv-id="${SLURM_JOB_ID:-flame}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$HEAD:$PORT" \
    -m flame train --config "$CONFIG" --train.run_dir "$RUN_DIR" "$@"
