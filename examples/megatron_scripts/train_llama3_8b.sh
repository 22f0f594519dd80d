#!/bin/bash
# NVIDIA Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh (core_v0.16.1) with this project's
# entry point swapped in for pretrain_gpt.py, run in bf16 (FP8 is not wired here). Every kept flag is
# NVIDIA's; each difference is marked "# here:" with the reason. Sizes can be reduced through the
# environment (the test runs 2 layers x 64 on CPU in fp32 with PRECISION= and SEQUENCE_PARALLEL=):
#   NUM_LAYERS=2 HIDDEN_SIZE=64 FFN_HIDDEN_SIZE=192 NUM_HEADS=4 NUM_QUERY_GROUPS=2 KV_CHANNELS=16 \
#   SEQ_LENGTH=64 GPUS_PER_NODE=1 GLOBAL_BATCH_SIZE=4 TRAIN_SAMPLES=12 PRECISION= \
#   bash train_llama3_8b.sh CKPT TB MOCK MOCK

CHECKPOINT_PATH=${1:-"checkpoints/llama3_8b"}
TENSORBOARD_LOGS_PATH=${2:-"tensorboard_logs/llama3_8b"}
TOKENIZER_ARG=${3:-"MOCK"} # Path to tokenizer model, or "MOCK"
DATA_ARG=${4:-"MOCK"}     # Data prefix, or "MOCK"

mkdir -p "$(dirname "$CHECKPOINT_PATH")"
mkdir -p "$(dirname "$TENSORBOARD_LOGS_PATH")"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=${NUM_NODES:-1}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NODE_RANK=${NODE_RANK:-0}

TP_SIZE=${TP:-1}
CP_SIZE=1
PP_SIZE=${PP:-1}
MICRO_BATCH_SIZE=1
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-128}
NUM_LAYERS=${NUM_LAYERS:-32}
SEQ_LENGTH=${SEQ_LENGTH:-8192}
MAX_POSITION_EMBEDDINGS=${SEQ_LENGTH}

DATA_CACHE_PATH="${DATA_CACHE_PATH:-${PWD}/benchmark_cache_llama3_8b}"
mkdir -p "$DATA_CACHE_PATH"

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --node_rank $NODE_RANK
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

MODEL_ARGS=(
    --use-mcore-models
    --model-family llama  # here: names the preset; every switch below is still given explicitly
    --num-layers $NUM_LAYERS
    --hidden-size ${HIDDEN_SIZE:-4096}
    --ffn-hidden-size ${FFN_HIDDEN_SIZE:-14336}
    --num-attention-heads ${NUM_HEADS:-32}
    --group-query-attention
    --num-query-groups ${NUM_QUERY_GROUPS:-8}
    --kv-channels ${KV_CHANNELS:-128}
    --seq-length $SEQ_LENGTH
    --max-position-embeddings $MAX_POSITION_EMBEDDINGS
    --position-embedding-type rope
    --rotary-base 1000000
    --rotary-percent 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --swiglu
    --init-method-std 0.0134
    --attention-backend ${ATTENTION_BACKEND:-fused}
    # here: --apply-layernorm-1p refused (zero-centred gamma: no local/CPU norm supports it, growth assumes plain gamma)
    --normalization RMSNorm  # here: Llama's norm, which NVIDIA's TE run picks through its layer spec
    --untie-embeddings-and-output-weights
    --disable-bias-linear
)

TRAINING_ARGS=(
    --micro-batch-size $MICRO_BATCH_SIZE
    --global-batch-size $GLOBAL_BATCH_SIZE
    --train-samples ${TRAIN_SAMPLES:-1953125000}
    --lr-decay-samples ${LR_DECAY_SAMPLES:-1949218748}
    --lr-warmup-samples ${LR_WARMUP_SAMPLES:-3906252}
    --lr 0.00015
    --min-lr 0.00001
    # here: --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 refused (one LR for all parameters)
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    ${PRECISION---bf16}
    # here: --grad-reduce-in-bf16 refused (gradients are reduced in fp32)
    --cross-entropy-loss-fusion
    # here: --calculate-per-token-loss refused (per-micro-batch mean loss, Megatron's default)
    --manual-gc
    --empty-unused-memory-level 1
    # here: --exit-duration-in-mins 235 left out (see docs/megatron_compat.md)
)

# here: the FP8 flags (--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
# --fp8-param-gather) are refused: FP8 needs Transformer Engine recipes, not wired here

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size $TP_SIZE
    --context-parallel-size $CP_SIZE
    --pipeline-model-parallel-size $PP_SIZE
    ${SEQUENCE_PARALLEL---sequence-parallel}
)

DDP_ARGS=(
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)
TRAINING_ARGS+=("${DDP_ARGS[@]}")

DATA_ARGS_LIST=()
if [[ "$TOKENIZER_ARG" == "MOCK" ]] || [[ "$DATA_ARG" == "MOCK" ]] || [[ -z "$TOKENIZER_ARG" ]]; then
    DATA_ARGS_LIST+=(
        "--mock-data"
        "--tokenizer-type NullTokenizer"
        "--vocab-size ${VOCAB_SIZE:-128256}"
        "--data-cache-path ${DATA_CACHE_PATH}"
        "--tiktoken-pattern v2"
        "--split '99,1,0'"
        "--no-create-attention-mask-in-dataloader"
        "--no-mmap-bin-files"
        "--num-workers ${NUM_WORKERS:-1}"
    )
else
    DATA_ARGS_LIST+=(
        "--data-path $DATA_ARG"
        "--tokenizer-type HuggingFaceTokenizer"
        "--tokenizer-model $TOKENIZER_ARG"
        "--data-cache-path ${DATA_CACHE_PATH}"
        "--split '99,1,0'"
        "--no-create-attention-mask-in-dataloader"
        "--no-mmap-bin-files"
        "--num-workers ${NUM_WORKERS:-1}"
        "--vocab-size ${VOCAB_SIZE:-128256}"
    )
fi

EVAL_AND_LOGGING_ARGS=(
    --log-interval 1
    --eval-iters ${EVAL_ITERS:-32}
    --eval-interval ${EVAL_INTERVAL:-100}
    --save-interval 1000
    --log-throughput
    # here: --profile --profile-step-start 4 --profile-step-end 6 refused (use the PyTorch profiler)
    --ckpt-format torch_dist
    --distributed-timeout-minutes 60
    --save "$CHECKPOINT_PATH"
    # here: --load only once a checkpoint exists (until `train` starts from scratch on an empty --load
    # directory, Megatron-LM's convention for a job's first run)
    $( [ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ] && echo --load "$CHECKPOINT_PATH" )
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)

torchrun ${DISTRIBUTED_ARGS[@]} -m megatron_staged train \
    ${MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${DATA_ARGS_LIST[@]} \
    ${EVAL_AND_LOGGING_ARGS[@]} \
    $EXTRA_FLAGS
