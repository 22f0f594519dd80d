#!/usr/bin/env bash
# Once, before the first job, on one CPU machine that sees the shared file system:
# a SentencePiece tokenizer (32000 pieces, or an existing Llama tokenizer.model) and Megatron
# .bin/.idx files written by tools/preprocess_data.py.
#
#   INPUT="/raw/web-*.jsonl" DATA_DIR=/shared/llama7b/data ./prepare_data.sh
#   TOKENIZER_MODEL=/models/llama/tokenizer.model INPUT=... DATA_DIR=... ./prepare_data.sh   # reuse a tokenizer
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
INPUT=${INPUT:?set INPUT to the JSONL (or plain text) files, e.g. INPUT=\"/raw/web-*.jsonl\"}
DATA_DIR=${DATA_DIR:?set DATA_DIR to a directory on the shared file system}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$DATA_DIR"
# shellcheck disable=SC2206  # INPUT is a glob on purpose
FILES=($INPUT)

if [ -n "${TOKENIZER_MODEL:-}" ]; then
  cp "$TOKENIZER_MODEL" "$DATA_DIR/tokenizer.model"
elif [ ! -f "$DATA_DIR/tokenizer.model" ]; then
  # 10M sampled lines are plenty for a 32k BPE vocabulary
  python "$REPO/tools/train_tokenizer.py" --input "${FILES[@]}" --model-prefix "$DATA_DIR/tokenizer" \
      --vocab-size 32000 --model-type bpe --input-sentence-size 10000000
fi

# writes $DATA_DIR/corpus_text_document.{bin,idx}; 210B tokens of training need about 420 GB (uint16 ids)
python "$REPO/tools/preprocess_data.py" --input "${FILES[@]}" --json-keys text \
    --output-prefix "$DATA_DIR/corpus" --tokenizer-type GPTSentencePieceTokenizer \
    --tokenizer-model "$DATA_DIR/tokenizer.model" --append-eod --workers "$WORKERS"
echo "data ready: --data-path $DATA_DIR/corpus_text_document --tokenizer-model $DATA_DIR/tokenizer.model"
