"""``megatron-staged import-hf --hf DIR --save CKPT``: a transformers model as an iteration-0 checkpoint.

Reads a local HuggingFace ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` directory (``config.json`` and
``model.safetensors``, sharded safetensors, or ``pytorch_model.bin``; nothing is downloaded) and
writes an ordinary checkpoint of this project at iteration 0, with fresh (zero) Adam moments, so
that ``megatron-staged train --load CKPT`` starts (staged) training from the released model.

Run it under torchrun at any world size that is a multiple of TP x PP: every rank builds its own
shard of the model at the target layout and fills it from the HF tensors of the layers it holds
(one layer at a time), so no rank holds the whole model. One plain process works too (TP1 PP1).

The embedding and output rows are padded with zeros to a multiple of
``--make-vocab-size-divisible-by`` x TP (Megatron-LM's rule; ``--vocab-padding lcm``: of their lcm);
``export-hf`` cuts them off again.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from megatron_staged.errors import ArgumentParser, UserError, require

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_args(argv):
    p = ArgumentParser(prog="megatron-staged import-hf",
                                description="Import a local HuggingFace GPT-2 / Llama model as a checkpoint.")
    p.add_argument("--hf", required=True, help="HuggingFace model directory (config.json + weights)")
    p.add_argument("--save", required=True, help="checkpoint directory to write (iteration 0)")
    p.add_argument("--target-tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameter dtype of the checkpoint (recorded as model.bf16)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="training sequence length to record (default: the model's max_position_embeddings)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--vocab-padding", choices=["megatron", "lcm"], default="megatron",
                   help="pad the vocabulary to a multiple of divisible_by x TP (megatron, Megatron-LM's rule) or "
                        "of lcm(divisible_by, TP) (lcm: the same size at every TP up to divisible_by)")
    p.add_argument("--use-distributed-optimizer", action="store_true",
                   help="record --use-distributed-optimizer in the checkpoint's args")
    p.add_argument("--no-optimizer", action="store_true", help="write weights only (no optimizer state)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint or files already in --save")
    return p.parse_args(argv)


# ---- reading HF weights lazily ---------------------------------------------------------------------

class HFWeights:
    """A HF model directory's tensors by name, read one at a time (safetensors or pytorch_model.bin)."""

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, str] = {}      # tensor name -> file
        self._open: dict[str, object] = {}
        # transformers' own order (modeling_utils): a single model.safetensors before the safetensors index,
        # then pytorch_model.bin before its index; a directory holding several reads what transformers reads
        found = next((f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                  "pytorch_model.bin.index.json") if os.path.isfile(os.path.join(path, f))), None)
        index = found if found and found.endswith(".index.json") else None
        if index:
            try:
                with open(os.path.join(path, index)) as fh:
                    self.files = dict(json.load(fh)["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"--hf {os.path.join(path, index)} is not a weight index (a JSON object with a "
                                f"'weight_map'): {type(e).__name__}: {e}") from None
            missing = sorted({f for f in self.files.values() if not os.path.isfile(os.path.join(path, f))})
            if missing:
                raise UserError(f"--hf {path}: {index} names {len(missing)} shard file(s) that are not there "
                                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); copy the whole "
                                f"model directory")
        else:
            single = found
            if single is None:
                raise UserError(f"--hf {path}: no model.safetensors, sharded safetensors index or pytorch_model.bin; "
                                f"save the model with model.save_pretrained(DIR)")
            self.files = {name: single for name in self._handle(single).keys()}

    def _handle(self, fname: str):
        if fname not in self._open:
            full = os.path.join(self.path, fname)
            try:
                if fname.endswith(".safetensors"):
                    from safetensors import safe_open

                    self._open[fname] = safe_open(full, framework="pt")
                else:
                    self._open[fname] = torch.load(full, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated / corrupt / foreign file: one line naming it
                raise UserError(f"--hf {full} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"is the file complete (a finished download or save_pretrained)?") from None
        return self._open[fname]

    def resolve(self, name: str) -> Optional[str]:
        """The stored name (old GPT-2 files lack the ``transformer.`` prefix)."""
        if name in self.files:
            return name
        if name.startswith("transformer.") and name[len("transformer."):] in self.files:
            return name[len("transformer."):]
        return None

    def shape(self, name: str) -> Optional[tuple]:
        stored = self.resolve(name)
        if stored is None:
            return None
        h = self._handle(self.files[stored])
        return tuple(h.get_slice(stored).get_shape()) if hasattr(h, "get_slice") else tuple(h[stored].shape)

    def dtype(self, name: str) -> Optional[str]:
        """The stored dtype as safetensors names it (F32, BF16, F16, F8_E4M3, I8, ...)."""
        stored = self.resolve(name)
        if stored is None:
            return None
        h = self._handle(self.files[stored])
        if hasattr(h, "get_slice"):
            return h.get_slice(stored).get_dtype()
        return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}.get(
            h[stored].dtype, str(h[stored].dtype).replace("torch.", ""))

    def get(self, name: str) -> torch.Tensor:
        stored = self.resolve(name)
        if stored is None:
            raise UserError(f"--hf {self.path}: the weights hold no tensor {name!r}")
        h = self._handle(self.files[stored])
        return h.get_tensor(stored) if hasattr(h, "get_tensor") else h[stored]


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"--hf {path}: no config.json; expected a directory written by model.save_pretrained()")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--hf {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--hf {cfg_path} holds a JSON {type(cfg).__name__}, not a model config object")
    return cfg


def arch_of(hf_cfg: dict, path: str):
    """The architecture of ``config.json``; a missing or mistyped field is one line naming it."""
    from megatron_staged.checkpoint.hf_mapping import arch_from_hf_config

    q = hf_cfg.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else q
        raise UserError(f"--hf {path}/config.json has a quantization_config (quant_method {method}): its weights are "
                        f"quantized (with scales import-hf does not apply); dequantize it first (load it in "
                        f"transformers and save_pretrained() in bf16)")

    try:
        return arch_from_hf_config(hf_cfg)
    except KeyError as e:
        raise UserError(f"--hf {path}/config.json has no {e.args[0]!r}, which a "
                        f"{hf_cfg.get('model_type')} config needs; was it written by save_pretrained()?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"--hf {path}/config.json has a field of the wrong type or value ({e})") from None


def check_hf_shapes(weights: HFWeights, arch) -> None:
    """UserError unless every tensor the architecture needs is present with the expected shape."""
    from megatron_staged.checkpoint.hf_mapping import expected_hf_shapes

    for name, shape in expected_hf_shapes(arch).items():
        got = weights.shape(name)
        if got is None:
            raise UserError(f"--hf {weights.path}: missing tensor {name} (config.json describes a "
                            f"{arch.hf_class} with {arch.num_layers} layers)")
        if tuple(got) != tuple(shape):
            raise UserError(f"--hf {weights.path}: {name} has shape {list(got)}, config.json implies {list(shape)}")
        dtype = weights.dtype(name)
        if dtype not in FLOAT_DTYPES:  # fp8 / int8 (quantized) values mean nothing without their scales
            raise UserError(f"--hf {weights.path}: {name} is stored as {dtype}; import-hf reads fp32/bf16/fp16 weights "
                            f"(a quantized model needs dequantizing first, e.g. loading it in transformers and "
                            f"save_pretrained() in bf16)")


def _note(msg: str) -> None:
    """Print once under torchrun, also before the process group exists (notes precede any work)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


def check_hf_tokenizer(hf_dir: str, vocab: int) -> bool:
    """True when ``hf_dir`` holds a tokenizer that loads (then recorded in the checkpoint). Tokenizer files
    that transformers cannot load are not recorded (a note says why: train and export-hf would fail on
    them later); a tokenizer with more tokens than the model has embedding rows is a UserError."""
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]
    if not present:
        return False
    from megatron_staged.data.tokenizer import build_tokenizer

    try:
        tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    except Exception as e:  # noqa: BLE001 - UserError from the loader, or whatever transformers raises
        detail = " ".join(str(e).split()) or type(e).__name__
        _note(f"note: the tokenizer files in --hf {hf_dir} ({', '.join(present)}) do not load ({detail}); "
                    f"importing the weights without a tokenizer: give train --tokenizer-type/--tokenizer-model")
        return False
    if tok.vocab_size > vocab:
        raise UserError(f"--hf {hf_dir}: its tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{vocab} (config.json); ids >= {vocab} would have no embedding row")
    return True


# ---- the checkpoint's config ---------------------------------------------------------------------

def import_config(arch, args, hf_dir: str, world_size: int, with_tokenizer: Optional[bool] = None):
    """The Config to store: architecture from HF, layout and dtype from the flags."""
    from megatron_staged.checkpoint.hf_mapping import GPT2, arch_to_model_fields
    from megatron_staged.config import Config, resolve_model, validate

    cfg = Config.from_dict({"model": arch_to_model_fields(arch)})
    m = cfg.model
    m.seq_length = args.seq_length or arch.max_positions
    if arch.hf_class == GPT2:  # learned positions: the HF model has no rows beyond n_positions
        require(m.seq_length <= arch.max_positions,
                f"--seq-length {m.seq_length} exceeds the HF model's {arch.max_positions} learned positions "
                f"(n_positions in {os.path.join(hf_dir, 'config.json')}); use --seq-length {arch.max_positions} or less")
    m.make_vocab_size_divisible_by = args.make_vocab_size_divisible_by
    m.vocab_padding = args.vocab_padding
    m.bf16 = args.dtype == "bf16"
    m.vocab_size = arch.vocab - 1  # NullTokenizer (mock data) semantics: ids 0..V-2 plus EOD V-1 = the HF vocabulary
    cfg.parallel.tensor_model_parallel_size = args.target_tensor_model_parallel_size
    cfg.parallel.pipeline_model_parallel_size = args.target_pipeline_model_parallel_size
    cfg.parallel.use_distributed_optimizer = args.use_distributed_optimizer
    if with_tokenizer is None:
        with_tokenizer = any(os.path.isfile(os.path.join(hf_dir, f)) for f in TOKENIZER_FILES)
    if with_tokenizer:
        cfg.data.tokenizer_type = "HuggingFaceTokenizer"
        cfg.data.tokenizer_model = os.path.abspath(hf_dir)
    resolve_model(m)
    try:  # layout checks (heads, groups, ffn, layers vs TP/PP, world size), naming this tool's flags
        validate(cfg.copy(), world_size)
    except UserError as e:
        msg = str(e).replace("--tensor-model-parallel-size", "--target-tensor-model-parallel-size")
        msg = msg.replace("--pipeline-model-parallel-size", "--target-pipeline-model-parallel-size")
        for flag, field in config_fields(arch).items():  # the sizes come from config.json, not flags
            msg = msg.replace(flag + " ", f"config.json's {field} ")
        raise UserError(msg) from None
    return cfg


def special_token_ids(hf_cfg: dict) -> dict:
    """bos/eos/pad ids of config.json (kept for export-hf when the checkpoint has no tokenizer)."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) or (  # noqa: E731
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
    return {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if ok(hf_cfg.get(k))}


def config_fields(arch) -> dict:
    """Megatron's size flags -> the config.json fields they were read from."""
    from megatron_staged.checkpoint.hf_mapping import GPT2

    if arch.hf_class == GPT2:
        return {"--num-layers": "n_layer", "--hidden-size": "n_embd", "--num-attention-heads": "n_head",
                "--ffn-hidden-size": "n_inner", "--max-position-embeddings": "n_positions"}
    return {"--num-layers": "num_hidden_layers", "--hidden-size": "hidden_size", "--num-attention-heads":
            "num_attention_heads", "--num-query-groups": "num_key_value_heads", "--ffn-hidden-size": "intermediate_size",
            "--kv-channels": "head_dim"}


# ---- filling the model -----------------------------------------------------------------------------

@torch.no_grad()
def fill_from_hf(model_chunks, weights: HFWeights, arch) -> int:
    """Copy each local shard from the HF tensors, one layer at a time; returns the shards filled."""
    from megatron_staged.checkpoint.hf_mapping import global_from_hf, hf_layer_prefix, layer_from_hf, split_layer_key
    from megatron_staged.model.builder import iter_sharded_tensors, layer_axis, unwrap

    n = 0
    for chunk in model_chunks:
        by_layer: dict[int, list] = {}
        for st in iter_sharded_tensors(unwrap(chunk).sharded_state_dict()):
            by_layer.setdefault(layer_axis(st)[0], []).append(st)
        for layer, shards in sorted(by_layer.items()):
            if layer < 0:
                full = {st.key: global_from_hf(st.key, weights.get, arch) for st in shards}
            else:
                prefix = hf_layer_prefix(arch, layer)
                params = layer_from_hf(lambda name: weights.get(prefix + name), arch)
                full = {st.key: params[split_layer_key(st.key)] for st in shards}
            for st in shards:
                copy_shard(st, full[st.key])
                n += 1
    return n


def copy_shard(st, full: torch.Tensor) -> None:
    """Copy this rank's slice of the global tensor ``full`` into the ShardedTensor's data."""
    _, n = (st.global_offset[0], st.prepend_axis_num) if st.prepend_axis_num else (-1, 0)
    expected = tuple(st.global_shape[n:])
    if tuple(full.shape) != expected:
        raise UserError(f"internal: {st.key} is {list(full.shape)} from HF, the model expects {list(expected)}")
    idx = tuple(slice(o, o + s) for o, s in zip(st.global_offset[n:], st.local_shape))
    st.data.copy_(full[idx].reshape(st.data.shape))


# ---- main ----------------------------------------------------------------------------------------------

def main(argv) -> int:
    import torch.distributed as dist

    from megatron_staged.checkpoint.manager import check_output_dir, save_checkpoint
    from megatron_staged.config import pad_vocab_size
    from megatron_staged.runtime.distributed import init_distributed, print_rank0

    args = parse_args(argv)
    for flag, v in (("--target-tensor-model-parallel-size", args.target_tensor_model_parallel_size),
                    ("--target-pipeline-model-parallel-size", args.target_pipeline_model_parallel_size),
                    ("--seq-length", args.seq_length),
                    ("--make-vocab-size-divisible-by", args.make_vocab_size_divisible_by)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v} must be positive (>= 1)")
    if not os.path.isdir(args.hf):
        raise UserError(f"--hf {args.hf}: no such directory (a local HuggingFace model directory; "
                        f"nothing is downloaded)")
    if os.path.realpath(args.save) == os.path.realpath(args.hf):
        raise UserError(f"--save {args.save} is the --hf directory being imported; give a new directory")
    check_output_dir(args.save, "--save", overwrite=args.overwrite)
    hf_cfg = read_hf_config(args.hf)
    tp = args.target_tensor_model_parallel_size
    arch = arch_of(hf_cfg, args.hf)
    arch = dataclasses.replace(arch, padded_vocab=pad_vocab_size(arch.vocab, args.make_vocab_size_divisible_by, tp,
                                                                   args.vocab_padding))
    from megatron_staged.checkpoint.hf_mapping import GPT2_EXACT_ACTS

    if hf_cfg.get("model_type") == "gpt2" and hf_cfg.get("activation_function", "gelu_new") not in GPT2_EXACT_ACTS:
        _note(f"note: this GPT-2 uses {hf_cfg.get('activation_function', 'gelu_new')} (tanh-approximated GeLU); "
                    f"megatron_staged's gpt2 family uses exact GeLU, so logits will differ slightly (~1e-3)")
    weights = HFWeights(args.hf)
    check_hf_shapes(weights, arch)
    with_tokenizer = check_hf_tokenizer(args.hf, arch.vocab)

    from megatron_staged.builders import build_components, build_optimizer
    from megatron_staged.training.state import TrainState

    init_distributed()
    cfg = import_config(arch, args, args.hf, dist.get_world_size(), with_tokenizer)
    comps = build_components(cfg, initialize=False, with_optimizer=False)
    model, layout = comps.model, comps.layout
    fill_from_hf(model, weights, arch)
    optimizer = None if args.no_optimizer else build_optimizer(cfg, model)  # after filling: fp32 masters copy weights
    train_state = TrainState(extra={"hf_import": {"source": os.path.abspath(args.hf), "architecture": arch.hf_class,
                                                  "vocab_size": arch.vocab, **special_token_ids(hf_cfg)}})
    path = save_checkpoint(args.save, 0, model, optimizer, None, train_state.to_dict(), cfg.to_dict(),
                           save_optimizer=optimizer is not None, replace_existing=args.overwrite)
    print_rank0(f"imported {arch.hf_class} from {args.hf} ({arch.num_layers} layers, hidden {arch.hidden}, "
                f"vocabulary {arch.vocab} padded to {arch.padded_vocab}) into {path} at {layout}, "
                f"{'bf16' if cfg.model.bf16 else 'fp32'}"
                f"{'' if optimizer is not None else ', weights only'}; resume with "
                f"`megatron-staged train --load {args.save} ...`")
    return 0
