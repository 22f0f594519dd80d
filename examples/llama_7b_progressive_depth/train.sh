#!/usr/bin/env bash
# Llama-style 7B grown 8 -> 16 -> 32 layers inside one job: one torchrun per node, 8 GPUs each.
#
# By hand, the same command on each of the 8 nodes (c10d rendezvous assigns the node ranks):
#   MASTER_ADDR=node0 NNODES=8 DATA_DIR=/shared/llama7b/data CKPT=/shared/llama7b/ckpt ./train.sh
# Under SLURM: sbatch slurm.sbatch (runs this script once per node through srun).
#
# Resume is automatic: --load and --save are the same directory, so a restarted or requeued job
# continues from the latest checkpoint (an empty directory starts from scratch), and the growth
# stages already applied are not applied again (they are in the checkpoint's stage history).
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
HERE="$REPO/examples/llama_7b_progressive_depth"

NNODES=${NNODES:-${SLURM_NNODES:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the hostname of the first node}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-${SLURM_JOB_ID:-llama7b_progressive_depth}}
DATA_DIR=${DATA_DIR:?set DATA_DIR to the directory prepare_data.sh wrote}
CKPT=${CKPT:?set CKPT to a checkpoint directory on the shared file system}
# stop cleanly (checkpoint, exit 0) before the scheduler's time limit; slurm.sbatch sets it
EXIT_DURATION_MINS=${EXIT_DURATION_MINS:-0}

export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's setting for overlapping TP/SP communication
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# InfiniBand clusters: NCCL picks the HCAs itself; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA only if it does not.

ARGS=(
  --config "$HERE/llama_7b.yaml"
  --data-path "$DATA_DIR/corpus_text_document"
  --tokenizer-model "$DATA_DIR/tokenizer.model"
  --save "$CKPT" --load "$CKPT"
  --tensorboard-dir "$CKPT/tensorboard" --log-file "$CKPT/metrics.jsonl"
  --recompute-granularity selective   # what the plan assumes (fused/SDPA attention stores no s x s scores)
  --exit-signal-handler               # SIGTERM (preemption, scancel): save and exit 0
)
if [ "$EXIT_DURATION_MINS" != 0 ]; then ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS"); fi

# Validate the whole run (flags + YAML + stages) in one process before taking the GPUs: seconds.
if [ "${SLURM_NODEID:-0}" = 0 ]; then
  python -m megatron_staged train --dry-run "${ARGS[@]}" --world-size $((NNODES * GPUS_PER_NODE)) --gpu-memory-gb 80
fi

exec python -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RUN_ID" \
    -m megatron_staged train "${ARGS[@]}"
