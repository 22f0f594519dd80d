#!/bin/bash
# NVIDIA Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh (core_v0.16.1) with this project's
# entry point swapped in for pretrain_gpt.py. Every flag is NVIDIA's; the differences are marked "# here:".
# The sizes can be reduced through the environment (the test runs it with 2 layers on CPU):
#   NUM_LAYERS=2 HIDDEN_SIZE=64 NUM_HEADS=4 SEQ_LENGTH=64 GPUS_PER_NODE=1 TP=1 PP=1 GLOBAL_BATCH_SIZE=4 \
#   TRAIN_ITERS=3 bash train_gpt3_175b_distributed.sh CKPT TB VOCAB_FILE MERGE_FILE DATA_PREFIX
# DATA_PREFIX=MOCK trains on --mock-data (here: as in NVIDIA's Llama example).

export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Change for multinode config
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$(($GPUS_PER_NODE*$NUM_NODES))

CHECKPOINT_PATH=$1 #<Specify path>
TENSORBOARD_LOGS_PATH=$2 #<Specify path>
VOCAB_FILE=$3 #<Specify path to file>/gpt2-vocab.json
MERGE_FILE=$4 #<Specify path to file>/gpt2-merges.txt
DATA_PATH=$5 #<Specify path and file prefix>_text_document

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

GPT_MODEL_ARGS=(
    --num-layers ${NUM_LAYERS:-96}
    --hidden-size ${HIDDEN_SIZE:-12288}
    --num-attention-heads ${NUM_HEADS:-96}
    --seq-length ${SEQ_LENGTH:-2048}
    --max-position-embeddings ${SEQ_LENGTH:-2048}
    --attention-backend auto # Can use (flash/fused/unfused/local)
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size ${GLOBAL_BATCH_SIZE:-1536}
    # here: --rampup-batch-size 16 16 5859375 is refused (constant global batch; Megatron-LM itself
    # rejects it with --train-iters: "expected no batch-size rampup for iteration-based training")
    --train-iters ${TRAIN_ITERS:-500000}
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --init-method-std 0.006
    --clip-grad 1.0
    ${PRECISION---fp16}
    --lr 6.0e-5
    --lr-decay-style cosine
    --min-lr 6.0e-6
    --lr-warmup-fraction .001
    --lr-decay-iters ${LR_DECAY_ITERS:-430000}
)

MODEL_PARALLEL_ARGS=(
	--tensor-model-parallel-size ${TP:-8}
	--pipeline-model-parallel-size ${PP:-16}
)

if [[ "$DATA_PATH" == "MOCK" ]]; then  # here: mock data, as NVIDIA's Llama example offers
    DATA_ARGS=(--mock-data --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE)
else
    DATA_ARGS=(
        --data-path $DATA_PATH
        --vocab-file $VOCAB_FILE
        --merge-file $MERGE_FILE
        --split 949,50,1
    )
fi

EVAL_AND_LOGGING_ARGS=(
    --log-interval ${LOG_INTERVAL:-100}
    --save-interval 10000
    --eval-interval 1000
    --save $CHECKPOINT_PATH
    # here: --load only once a checkpoint exists (until `train` starts from scratch on an empty --load
    # directory, Megatron-LM's convention for a job's first run)
    $( [ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ] && echo --load "$CHECKPOINT_PATH" )
    --eval-iters ${EVAL_ITERS:-10}
    --tensorboard-dir $TENSORBOARD_LOGS_PATH
)

# here: `-m megatron_staged train` instead of pretrain_gpt.py (GPT2BPETokenizer is Megatron's default
# tokenizer type when --vocab-file/--merge-file are given)
torchrun ${DISTRIBUTED_ARGS[@]} -m megatron_staged train \
    ${GPT_MODEL_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${DATA_ARGS[@]} \
    ${EVAL_AND_LOGGING_ARGS[@]} \
    $EXTRA_FLAGS
