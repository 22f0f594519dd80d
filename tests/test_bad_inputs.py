"""A catalogue of bad inputs across every command: each gets one ``error:`` line, exit status 2, and
changes no file.

Each case runs ``megatron_staged.cli.main(argv)`` in this process (stderr captured), against a
sandbox built once per module: copies of one real checkpoint (iterations 1 and 2, with manifest),
damaged and booby-trapped variants of it, indexed datasets, a user's directory with a config.json.
Every case must fail before megatron-core is imported: ``test_catalogue_fails_before_megatron``
runs the whole catalogue again in one fresh process and checks ``megatron.core`` was never loaded.

Run as a script (``python tests/test_bad_inputs.py SANDBOX``) it runs the catalogue and prints one
JSON object (used by that test).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, TINY_MOCK, _env  # noqa: E402

MARKER = "TRAP_RAN"  # a booby-trapped pickle creates this file in the sandbox when unpickled
COMMANDS_READING_CHECKPOINTS = ["inspect", "evaluate", "train", "grow", "convert", "export-hf"]


# ---- the sandbox ----------------------------------------------------------------------------------

class _Trap:
    """Unpickling this calls open(marker, 'w'): a stand-in for any code a malicious pickle runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(ckpt_iter_dir, name):
    """Rewrite the manifest entry of ``name`` so that the size/checksum check passes (as an attacker would)."""
    mpath = os.path.join(ckpt_iter_dir, "manifest.json")
    m = json.load(open(mpath))
    path = os.path.join(ckpt_iter_dir, name)
    data = open(path, "rb").read()
    m["files"][name] = {"size": len(data), "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}
    json.dump(m, open(mpath, "w"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def write_indexed(prefix, lengths, dtype_code=8, itemsize=2, bin_bytes=None):
    """A megatron-core .idx (MMIDIDX v1) for sequences of ``lengths`` tokens, and its .bin."""
    n = len(lengths)
    pointers, off = [], 0
    for L in lengths:
        pointers.append(off)
        off += L * itemsize
    with open(prefix + ".idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, dtype_code, n, n + 1))
        fh.write(struct.pack(f"<{n}i", *lengths))
        fh.write(struct.pack(f"<{n}q", *pointers))
        fh.write(struct.pack(f"<{n + 1}q", *range(n + 1)))
    with open(prefix + ".bin", "wb") as fh:
        fh.write(b"\x01\x00" * (off // 2) if bin_bytes is None else bin_bytes)


def build_sandbox(root, good_ckpt):
    """Every file the catalogue points at, under ``root``."""
    import torch

    os.makedirs(root)
    s = lambda *p: os.path.join(root, *p)  # noqa: E731
    _copy(good_ckpt, s("good"))
    _copy(good_ckpt, s("other_model"))  # stands for "another run's checkpoint" as a --save target
    latest = "iter_0000002"
    damage = {
        "truncated_distcp": lambda d: open(os.path.join(d, latest, "__0_0.distcp"), "r+b").truncate(1000),
        "missing_distcp": lambda d: os.remove(os.path.join(d, latest, "__0_1.distcp")),
        "missing_metadata": lambda d: os.remove(os.path.join(d, latest, ".metadata")),
        "tracker_missing_iteration": lambda d: open(os.path.join(d, "latest_checkpointed_iteration.txt"), "w").write("7"),
        "tracker_garbage": lambda d: open(os.path.join(d, "latest_checkpointed_iteration.txt"), "w").write("latest"),
        "garbled_common": lambda d: _garble(os.path.join(d, latest, "common.pt")),
        "truncated_no_manifest": lambda d: (os.remove(os.path.join(d, latest, "manifest.json")),
                                            open(os.path.join(d, latest, "__0_1.distcp"), "r+b").truncate(10)),
    }
    for name, fn in damage.items():
        fn(_copy(good_ckpt, s("damaged", name)))
    marker = s(MARKER)
    d = _copy(good_ckpt, s("trapped", "common"))
    torch.save({"args": _Trap(marker), "iteration": 2}, os.path.join(d, latest, "common.pt"))
    _reseal(os.path.join(d, latest), "common.pt")
    import numpy as np

    d = _copy(good_ckpt, s("trapped", "numpy_object"))  # numpy arrays are allowed, object arrays are not
    common = torch.load(os.path.join(d, latest, "common.pt"), weights_only=False)
    torch.save(dict(common, rng_state=np.array([_Trap(marker)], dtype=object)), os.path.join(d, latest, "common.pt"))
    _reseal(os.path.join(d, latest), "common.pt")
    # an older checkpoint: common.pt holds numpy's RNG state tuple (a uint32 array), which is data
    d = _copy(good_ckpt, s("numpy_rng"))
    torch.save(dict(common, rng_state=[{"random_rng_state": (3, (1, 2), None), "np_rng_state": np.random.get_state(),
                                        "torch_rng_state": torch.get_rng_state()}]),
               os.path.join(d, latest, "common.pt"))
    _reseal(os.path.join(d, latest), "common.pt")
    d = _copy(good_ckpt, s("trapped", "metadata"))
    import pickle

    with open(os.path.join(d, latest, ".metadata"), "wb") as fh:
        pickle.dump(_Trap(marker), fh)
    _reseal(os.path.join(d, latest), ".metadata")
    # an iteration directory tree without a tracker
    os.makedirs(s("no_tracker"))
    shutil.copytree(os.path.join(good_ckpt, latest), s("no_tracker", latest))
    # Megatron-LM checkpoints in other formats: legacy 'torch' with a rank's file missing
    # (mp_rank_TT_PPP/model_optim_rng.pt; the present one is never unpickled, so any bytes do) and a zarr dist checkpoint (metadata.json names the backend)
    os.makedirs(s("legacy_torch", "iter_0000010", "mp_rank_01_000"))
    open(s("legacy_torch", "latest_checkpointed_iteration.txt"), "w").write("10")
    open(s("legacy_torch", "iter_0000010", "mp_rank_01_000", "model_optim_rng.pt"), "wb").write(b"not read")
    os.makedirs(s("zarr", "iter_0000003"))
    open(s("zarr", "latest_checkpointed_iteration.txt"), "w").write("3")
    json.dump({"sharded_backend": "zarr", "sharded_backend_version": 1},
              open(s("zarr", "iter_0000003", "metadata.json"), "w"))
    # data
    os.makedirs(s("data"))
    write_indexed(s("data", "ok"), [5, 7, 9])
    write_indexed(s("data", "short_bin"), [5, 7, 9], bin_bytes=b"\x01\x00" * 10)
    write_indexed(s("data", "bad_header"), [5])
    with open(s("data", "bad_header.idx"), "r+b") as fh:
        fh.write(b"NOTANIDX!")
    write_indexed(s("data", "truncated_idx"), [5, 7, 9])
    with open(s("data", "truncated_idx.idx"), "r+b") as fh:
        fh.truncate(40)
    # configs
    open(s("bad.yaml"), "w").write("model: {hidden_size: [1, 2\n")
    open(s("list.yaml"), "w").write("- 1\n- 2\n")
    open(s("unknown.yaml"), "w").write("hidden_sise: 64\n")
    open(s("ramp.yaml"), "w").write("training:\n  rampup_batch_size: [2, 2, 20]\n")
    open(s("stage_typo.yaml"), "w").write("staging:\n  stages:\n    - {at_iteraton: 1, depth_factor: 2}\n")
    open(s("late_stage.yaml"), "w").write("staging:\n  stages:\n    - {at_iteration: 50, depth_factor: 2}\n")
    open(s("unmappable_stage.yaml"), "w").write("staging:\n  stages:\n    - {at_iteration: 1, depth_map: '0,1,5'}\n")
    open(s("unknown_stage_key.yaml"), "w").write("staging:\n  stages:\n    - {at_iteration: 1, depth_factr: 2}\n")
    open(s("negative_stage.yaml"), "w").write("staging:\n  stages:\n    - {at_iteration: -1, depth_factor: 2}\n")
    # a user's directory (export-hf --out target), a plain file, a HF-like directory
    os.makedirs(s("user_dir"))
    open(s("user_dir", "config.json"), "w").write('{"mine": true}\n')
    open(s("a_file"), "w").write("not a directory\n")
    os.makedirs(s("hf"))
    open(s("hf", "config.json"), "w").write('{"model_type": "gpt2"}\n')
    os.makedirs(s("empty"))
    os.makedirs(s("hf_no_fields"))
    open(s("hf_no_fields", "config.json"), "w").write('{"model_type": "gpt2", "n_layer": 2}\n')
    os.makedirs(s("hf_not_json"))
    open(s("hf_not_json", "config.json"), "w").write("{model_type: gpt2\n")
    open(s("not_json.jsonl"), "w").write("step 1 loss 3.2\n")
    open(s("one_loss.jsonl"), "w").write('{"iteration": 1, "loss": 3.0}\n')
    return root


def _garble(path):
    n = os.path.getsize(path)
    with open(path, "wb") as fh:
        fh.write(b"\x00garbage" * (n // 8) + b"\x00" * (n % 8))


# ---- the catalogue --------------------------------------------------------------------------------
# (id, argv with {S} for the sandbox, regex the error line must match)

T = TINY_MOCK + ["--train-iters", "2"]
CASES = [
    # values: zero, negative, NaN, out of range
    ("lr-negative", ["train", *T, "--lr", "-1"], r"--lr -1.0 must be positive"),
    ("lr-zero", ["train", *T, "--lr", "0"], r"--lr 0.0 must be positive"),
    ("lr-nan", ["train", *T, "--lr", "nan"], r"--lr nan must be positive"),
    ("min-lr-above-lr", ["train", *T, "--lr", "0.1", "--min-lr", "1"], r"--min-lr 1.0 exceeds --lr 0.1"),
    ("rope-scaling-without-rope", ["train", *T, "--position-embedding-type", "learned_absolute", "--use-rope-scaling"],
     r"--use-rope-scaling scales rotary embeddings; it needs --position-embedding-type rope"),
    ("warmup-init-above-lr", ["train", *T, "--lr", "0.1", "--lr-warmup-init", "1"],
     r"--lr-warmup-init 1.0 exceeds --lr 0.1"),
    # megatron-core's scheduler asserts warmup < decay span (here the 2 training iterations)
    ("warmup-as-long-as-decay", ["train", *T, "--lr-warmup-iters", "2"],
     r"the LR warmup \(2 iterations\) must be shorter than the decay span \(2"),
    ("hidden-zero", ["train", *T, "--hidden-size", "0"], r"--hidden-size 0 must be positive"),
    ("hidden-negative", ["train", *T, "--hidden-size", "-8"], r"--hidden-size -8 must be positive"),
    ("layers-negative", ["train", *T, "--num-layers", "-1"], r"--num-layers -1 must be non-negative"),
    ("heads-zero", ["train", *T, "--num-attention-heads", "0"], r"--num-attention-heads 0 must be positive"),
    ("seq-zero", ["train", *T, "--seq-length", "0"], r"--seq-length 0 must be positive"),
    ("iters-zero", ["train", *T, "--train-iters", "0"], r"--train-iters 0 must be positive"),
    ("iters-negative", ["train", *T, "--train-iters", "-5"], r"--train-iters -5 must be positive"),
    ("iters-fraction", ["train", *T, "--train-iters", "1.5"], r"--train-iters: cannot interpret '1.5' as int"),
    ("mbs-zero", ["train", *T, "--micro-batch-size", "0"], r"--micro-batch-size 0 must be positive"),
    ("gbs-zero", ["train", *T, "--global-batch-size", "0"], r"--global-batch-size 0 must be positive"),
    ("gbs-negative", ["train", *T, "--global-batch-size", "-4"], r"--global-batch-size -4 must be positive"),
    ("eval-iters-negative", ["train", *T, "--eval-iters", "-1"], r"--eval-iters -1 must be non-negative"),
    ("evaluate-eval-iters-zero", ["evaluate", *T, "--load", "{S}/good", "--eval-iters", "0"],
     r"evaluate needs --eval-iters of at least 1"),
    ("log-interval-zero", ["train", *T, "--log-interval", "0"], r"--log-interval 0 must be positive"),
    ("save-interval-zero-with-save", ["train", *T, "--save", "{S}/new", "--save-interval", "0"],
     r"--save-interval 0 with --save: Megatron-LM's validate_args refuses it too"),
    ("save-interval-negative", ["train", *T, "--save-interval", "-1"], r"--save-interval -1 must be non-negative"),
    ("warmup-negative", ["train", *T, "--lr-warmup-iters", "-1"], r"--lr-warmup-iters -1 must be non-negative"),
    ("decay-iters-zero", ["train", *T, "--lr-decay-iters", "0"], r"--lr-decay-iters 0 must be positive"),
    ("weight-decay-negative", ["train", *T, "--weight-decay", "-0.1"], r"--weight-decay -0.1 must be non-negative"),
    ("clip-grad-negative", ["train", *T, "--clip-grad", "-1"], r"--clip-grad -1.0 must be non-negative"),
    ("beta1-one", ["train", *T, "--adam-beta1", "1.0"], r"--adam-beta1 1.0 must be below 1"),
    ("adam-eps-zero", ["train", *T, "--adam-eps", "0"], r"--adam-eps 0.0 must be positive"),
    ("dropout-above-one", ["train", *T, "--hidden-dropout", "1.5"], r"--hidden-dropout 1.5 must be below 1"),
    ("tp-zero", ["train", *T, "--tensor-model-parallel-size", "0"], r"--tensor-model-parallel-size 0 must be positive"),
    ("pp-negative", ["train", *T, "--pipeline-model-parallel-size", "-1"], r"--pipeline-model-parallel-size -1 must be positive"),
    ("vocab-zero", ["train", *T, "--vocab-size", "0"], r"--vocab-size 0 must be positive"),
    ("exit-duration-negative", ["train", *T, "--exit-duration-in-mins", "-1"], r"--exit-duration-in-mins -1.0 must be non-negative"),
    ("lr-not-a-number", ["train", *T, "--lr", "fast"], r"--lr: cannot interpret 'fast' as float"),
    # flags: abbreviations are not taken as other flags; unknown flags and choices
    ("abbrev-lr-warmup", ["train", *T, "--lr-warmup", "3"], r"unrecognized arguments: --lr-warmup 3"),
    ("abbrev-hidden", ["train", *T, "--hidden", "64"], r"unrecognized arguments: --hidden 64"),
    ("abbrev-grow-depth", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth", "2"], r"unrecognized arguments: --depth 2"),
    ("unknown-flag", ["train", *T, "--bogus-flag"], r"unrecognized arguments: --bogus-flag"),
    ("bad-choice", ["train", *T, "--model-family", "gpt3"], r"invalid choice: 'gpt3'"),
    ("missing-required", ["convert", "--load", "{S}/good"], r"the following arguments are required: --save"),
    ("unknown-command", ["trian"], r"unknown command 'trian'"),
    # arithmetic
    ("split-four", ["train", *T, "--split", "1,2,3,4"], r"--split '1,2,3,4': expected up to three"),
    ("split-letters", ["train", *T, "--split", "a,b"], r"--split 'a,b': expected up to three comma-separated numbers"),
    ("split-zero", ["train", *T, "--split", "0,0,0"], r"--split '0,0,0': expected up to three non-negative"),
    ("heads-not-dividing", ["train", *T, "--hidden-size", "100", "--num-attention-heads", "3"], r"--hidden-size 100 is not divisible by --num-attention-heads 3"),
    ("gqa-without-groups", ["train", *T, "--group-query-attention"], r"--group-query-attention needs --num-query-groups"),
    # YAML config
    ("config-missing", ["train", *T, "--config", "{S}/nope.yaml"], r"--config: cannot read .*nope.yaml"),
    ("config-invalid", ["train", *T, "--config", "{S}/bad.yaml"], r"--config: .*bad.yaml is not valid YAML"),
    ("config-not-mapping", ["train", *T, "--config", "{S}/list.yaml"], r"must hold a mapping of config keys"),
    ("config-unknown-key", ["train", *T, "--config", "{S}/unknown.yaml"], r"unknown config key 'hidden_sise' \(did you mean 'hidden_size'\?\)"),
    ("config-refused-key", ["train", *T, "--config", "{S}/ramp.yaml"], r"config key 'rampup_batch_size' \(Megatron-LM's --rampup-batch-size\): batch-size ramp-up is not supported"),
    ("stage-key-typo", ["train", *T, "--config", "{S}/stage_typo.yaml"], r"unknown key\(s\) \['at_iteraton'\] \(did you mean 'at_iteration'\?\)"),
    ("stage-beyond-train-iters", ["train", *T, "--config", "{S}/late_stage.yaml"], r"staging.stages\[0\].at_iteration 50 is not before --train-iters 2: the stage would never run"),
    ("stage-negative", ["train", *T, "--config", "{S}/negative_stage.yaml"], r"staging.stages\[0\].at_iteration -1 must be >= 0"),
    ("stage-unmappable", ["train", *T, "--config", "{S}/unmappable_stage.yaml"], r"staging.stages\[0\].*refers to layer 5"),
    ("stage-unknown-key", ["train", *T, "--config", "{S}/unknown_stage_key.yaml"], r"staging.stages\[0\].*depth_factr"),
    # data
    ("data-missing", ["train", *T, "--no-mock-data", "--data-path", "{S}/data/nope"], r"no indexed dataset at .*data/nope"),
    ("data-odd-pairs", ["train", *T, "--no-mock-data", "--data-path", "0.5", "{S}/data/ok", "0.5"], r"got an odd number of items \(3\)"),
    ("data-weight-text", ["train", *T, "--no-mock-data", "--data-path", "0.5", "{S}/data/ok", "heavy", "{S}/data/ok"], r"weight 'heavy' .* is not a number"),
    ("data-weight-among-prefixes", ["train", *T, "--no-mock-data", "--data-path", "{S}/data/ok", "0.5"], r"'0.5' looks like a weight among prefixes"),
    ("data-weight-negative", ["train", *T, "--no-mock-data", "--data-path", "-1", "{S}/data/ok", "1", "{S}/data/ok"], r"weight -1 of .* must be a non-negative"),
    ("data-weights-zero", ["train", *T, "--no-mock-data", "--data-path", "0", "{S}/data/ok", "0", "{S}/data/ok"], r"blend weights sum to 0"),
    ("data-valid-only", ["train", *T, "--no-mock-data", "--valid-data-path", "{S}/data/ok"], r"no training data: --valid/--test-data-path without --train-data-path"),
    ("data-bin-mismatch", ["train", *T, "--no-mock-data", "--data-path", "{S}/data/short_bin"], r"short_bin.bin does not match .*short_bin.idx"),
    ("data-idx-header", ["train", *T, "--no-mock-data", "--data-path", "{S}/data/bad_header"], r"bad_header.idx is not a valid megatron-core index \(bad header\)"),
    ("data-idx-truncated", ["train", *T, "--no-mock-data", "--data-path", "{S}/data/truncated_idx"], r"truncated_idx.idx is truncated"),
    ("tokenizer-missing", ["train", *T, "--no-mock-data", "--data-path", "{S}/data/ok", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{S}/nope.model"], r"--tokenizer-model .*nope.model: no such file"),
    # checkpoints: load and save targets of a run
    ("evaluate-no-load", ["evaluate", *T], r"evaluate needs --load CKPT"),
    ("evaluate-load-absent", ["evaluate", *T, "--load", "{S}/nope"], r"--load .*nope: no checkpoint there"),
    ("load-legacy-torch-format", ["train", *T, "--load", "{S}/legacy_torch"], r"damaged checkpoint: .*legacy_torch/iter_0000010/mp_rank_00_000/model_optim_rng.pt is missing"),
    ("grow-legacy-torch-iter-dir", ["grow", "--load", "{S}/legacy_torch/iter_0000010", "--save", "{S}/out", "--depth-factor", "2"], r"damaged checkpoint: .*iter_0000010/mp_rank_00_000/model_optim_rng.pt is missing"),
    ("export-zarr-format", ["export-hf", "--load", "{S}/zarr", "--out", "{S}/out"], r"zarr/iter_0000003 is a dist_checkpointing checkpoint in the 'zarr' format; .*reads the torch_dist and legacy torch formats only: .*--ckpt-convert-format torch_dist"),
    ("load-iters-without-tracker", ["train", *T, "--load", "{S}/no_tracker"], r"holds iter_0000002 .* but no latest_checkpointed_iteration.txt"),
    ("save-other-run", ["train", *T, "--num-layers", "4", "--save", "{S}/other_model"], r"--save .*other_model already holds a checkpoint, iteration 2 of a different model .*this run starts from scratch"),
    ("save-same-model-no-load", ["train", *T, "--save", "{S}/other_model"], r"already holds a checkpoint, iteration 2 \(gpt2 2 layers.*resume it with --load"),
    # (resuming in another precision or optimizer kind now loads: tests/test_optimizer_switch.py; what is
    # still refused there, Megatron-LM's flat dp_reshardable optimizer into a plain run, is checked there)
    ("save-load-elsewhere", ["train", *T, "--load", "{S}/good", "--save", "{S}/other_model"], r"this run does not resume it \(--load"),
    ("finetune-into-source", ["train", *T, "--load", "{S}/good", "--finetune", "--save", "{S}/good"], r"--finetune restarts at iteration 0"),
    ("save-is-file", ["train", *T, "--save", "{S}/a_file"], r"--save .*a_file is a file"),
    # found as a new user: IsADirectoryError / NotADirectoryError tracebacks after the model was built
    ("log-file-is-dir", ["train", *T, "--log-file", "{S}/user_dir"], r"--log-file .*user_dir is a directory"),
    ("log-file-under-a-file", ["train", *T, "--log-file", "{S}/a_file/x/log.jsonl"],
     r"--log-file .*a_file is a file, so the directory for it cannot be made"),
    ("tensorboard-dir-is-file", ["train", *T, "--tensorboard-dir", "{S}/a_file"],  # was a warning: TB disabled
     r"--tensorboard-dir .*a_file is a file; give a directory"),
    ("data-cache-path-is-file", ["train", *T, "--data-cache-path", "{S}/a_file"], r"--data-cache-path .*a_file is a file"),
    ("both-scheduler-flags", ["train", *T, "--train-iters", "4", "--load", "{S}/good", "--save", "{S}/good", "--override-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler"], r"choose one of --override-opt-param-scheduler and --use-checkpoint-opt_param-scheduler"),
    # tools: never overwrite by surprise
    ("grow-into-own-root", ["grow", "--load", "{S}/good", "--save", "{S}/good", "--depth-factor", "2"], r"would write into the source checkpoint"),
    ("grow-iter-into-root", ["grow", "--load", "{S}/good/iter_0000001", "--save", "{S}/good", "--depth-factor", "2", "--overwrite"], r"would write into the source checkpoint"),
    ("grow-into-other-model", ["grow", "--load", "{S}/good", "--save", "{S}/other_model", "--depth-factor", "2"], r"--save .*other_model already holds a checkpoint \(iteration 2 of a gpt2 model.*pass --overwrite"),
    ("convert-into-user-dir", ["convert", "--load", "{S}/good", "--save", "{S}/user_dir"], r"--save .*user_dir is not empty \(1 entry, e.g. config.json\)"),
    ("convert-into-source", ["convert", "--load", "{S}/good", "--save", "{S}/good/iter_0000002"], r"would write into the source checkpoint"),
    ("convert-tp-zero", ["convert", "--load", "{S}/good", "--save", "{S}/new", "--target-tensor-model-parallel-size", "0"], r"--target-tensor-model-parallel-size 0 must be positive"),
    ("export-into-user-dir", ["export-hf", "--load", "{S}/good", "--out", "{S}/user_dir"], r"--out .*user_dir is not empty \(1 entry, e.g. config.json\)"),
    ("export-out-file", ["export-hf", "--load", "{S}/good", "--out", "{S}/a_file"], r"--out .*a_file is a file"),
    ("export-into-checkpoint", ["export-hf", "--load", "{S}/good", "--out", "{S}/good", "--overwrite"], r"would write into the source checkpoint"),
    ("import-hf-absent", ["import-hf", "--hf", "{S}/nope", "--save", "{S}/new"], r"--hf .*nope: no such directory"),
    ("import-into-user-dir", ["import-hf", "--hf", "{S}/hf", "--save", "{S}/user_dir"], r"--save .*user_dir is not empty"),
    ("import-into-checkpoint", ["import-hf", "--hf", "{S}/hf", "--save", "{S}/other_model"], r"already holds a checkpoint"),
    ("import-tp-zero", ["import-hf", "--hf", "{S}/hf", "--save", "{S}/new", "--target-tensor-model-parallel-size", "0"], r"--target-tensor-model-parallel-size 0 must be positive"),
    ("inspect-absent", ["inspect", "{S}/nope"], r"nope: no such checkpoint directory"),
    ("inspect-load-spelling-absent", ["inspect", "--load", "{S}/nope"], r"nope: no such checkpoint directory"),
    ("inspect-two-checkpoints", ["inspect", "{S}/good", "--load", "{S}/good"], r"give one checkpoint: `inspect CKPT` or `inspect --load CKPT`"),
    ("inspect-not-checkpoint", ["inspect", "{S}/empty"], r"not a checkpoint \(no latest_checkpointed_iteration.txt"),
    # tried as a new user in a second round (docs/reliability.md): growth requests, tool flags, configs, logs
    ("grow-map-reorders", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth-map", "1,0"], r"--depth-map puts layer 1 before layer 0"),
    ("grow-map-drops-a-layer", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth-map", "0,0,0"], r"--depth-map leaves out layer 1"),
    ("grow-map-empty-entry", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth-map", "0,,1"], r"--depth-map entry '' is not a layer index"),
    ("grow-shrinks", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth-factor", "0.5"], r"depth growth to 1 layers from 2: the target must not be shallower"),
    ("grow-width-three", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--width-factor", "3"], r"--width-factor: 3 is not one of \[1, 2\]"),
    ("grow-rho-zero", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth-factor", "2", "--rho", "0"], r"--rho 0.0 must be > 0"),
    ("grow-pp-not-dividing", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--depth-factor", "2", "--target-pipeline-model-parallel-size", "3"], r"does not fit target TP 1 x PP 3 .*--num-layers 4 is not divisible"),
    ("grow-noise-negative", ["grow", "--load", "{S}/good", "--save", "{S}/new", "--width-factor", "2", "--width-noise", "-1"], r"--width-noise -1.0 must be >= 0"),
    ("convert-dtype-fp16", ["convert", "--load", "{S}/good", "--save", "{S}/new", "--dtype", "fp16"], r"--dtype: invalid choice: 'fp16'"),
    ("convert-pp-beyond-layers", ["convert", "--load", "{S}/good", "--save", "{S}/new", "--target-pipeline-model-parallel-size", "4"], r"--num-layers 2 is not divisible by --target-pipeline-model-parallel-size 4"),
    ("convert-load-file", ["convert", "--load", "{S}/a_file", "--save", "{S}/new"], r"a_file: not a checkpoint"),
    ("export-vocab-zero", ["export-hf", "--load", "{S}/good", "--out", "{S}/new", "--vocab-size", "0"], r"vocabulary size 0 must be in 1\.\.256"),
    ("import-config-missing-field", ["import-hf", "--hf", "{S}/hf_no_fields", "--save", "{S}/new"], r"config.json has no 'n_embd', which a gpt2 config needs"),
    ("import-config-not-json", ["import-hf", "--hf", "{S}/hf_not_json", "--save", "{S}/new"], r"config.json is not valid JSON"),
    ("train-load-file", ["train", *T, "--load", "{S}/a_file"], r"--load .*a_file is a file; give a checkpoint directory"),
    ("evaluate-load-file", ["evaluate", *T, "--load", "{S}/a_file"], r"--load .*a_file is a file; give a checkpoint directory"),
    ("padded-vocab-too-small", ["train", *T, "--padded-vocab-size", "64"], r"--padded-vocab-size 64 is smaller than --vocab-size 128"),
    ("seq-beyond-positions", ["train", *T, "--max-position-embeddings", "8"], r"--max-position-embeddings 8 < --seq-length 16"),
    ("groups-not-dividing", ["train", *T, "--group-query-attention", "--num-query-groups", "3"], r"--num-attention-heads 2 is not divisible by --num-query-groups 3"),
    ("exit-interval-negative", ["train", *T, "--exit-interval", "-2"], r"--exit-interval -2 must be non-negative"),
    ("seed-negative", ["train", *T, "--seed", "-1"], r"--seed -1 must be non-negative"),
    ("norm-epsilon-zero", ["train", *T, "--norm-epsilon", "0"], r"--norm-epsilon 0.0 must be positive"),
    ("plan-gpus-zero", ["plan", "--gpus", "0", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2"], r"--gpus/--world-size 0 must be positive"),
    ("plan-memory-negative", ["plan", "--gpus", "1", "--gpu-memory-gb", "-1", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2"], r"--gpu-memory-gb -1.0 must be positive"),
    ("plan-tokens-negative", ["plan", "--gpus", "1", "--train-tokens", "-5", "--global-batch-size", "8", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2"], r"--train-tokens -5.0 must be positive"),
    ("plan-mfu-above-one", ["plan", "--gpus", "1", "--mfu", "2", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2"], r"--mfu 2.0 must be in \(0, 1\]"),
    ("report-not-json", ["report", "{S}/not_json.jsonl"], r"not_json.jsonl:1: not a JSON line"),
    ("report-missing", ["report", "{S}/nope.jsonl"], r"nope.jsonl: no such file"),
    ("fit-rho-smooth-zero", ["fit-rho", "--small", "{S}/one_loss.jsonl", "--large", "{S}/one_loss.jsonl", "--smooth", "0"], r"--smooth must be >= 1"),
    ("fit-rho-one-loss", ["fit-rho", "--small", "{S}/one_loss.jsonl", "--large", "{S}/one_loss.jsonl"], r"one_loss.jsonl holds fewer than 2 training losses"),
    ("inspect-file", ["inspect", "{S}/a_file"], r"a_file: not a checkpoint"),
]


def _reader_argv(command, ckpt):
    return {
        "inspect": ["inspect", ckpt],
        "evaluate": ["evaluate", *T, "--load", ckpt],
        "train": ["train", *T, "--train-iters", "3", "--load", ckpt, "--save", ckpt],
        "grow": ["grow", "--load", ckpt, "--save", "{S}/new", "--depth-factor", "2"],
        "convert": ["convert", "--load", ckpt, "--save", "{S}/new"],
        "export-hf": ["export-hf", "--load", ckpt, "--out", "{S}/new"],
    }[command]


DAMAGE = {
    "truncated_distcp": r"damaged checkpoint: .*iter_0000002/__0_0.distcp is damaged: 1000 bytes, manifest.json recorded",
    "missing_distcp": r"damaged checkpoint: .*iter_0000002/__0_1.distcp is missing",
    "missing_metadata": r"damaged checkpoint: .*iter_0000002/.metadata is missing",
    "tracker_missing_iteration": r"damaged checkpoint: .*latest_checkpointed_iteration.txt names iteration 7 but .*iter_0000007 is missing",
    "tracker_garbage": r"latest_checkpointed_iteration.txt holds 'latest', not an iteration number",
    "garbled_common": r"iter_0000002/common.pt is damaged: cannot read it \(not a torch.save file\)",
    "truncated_no_manifest": r"damaged checkpoint: .*iter_0000002/__0_1.distcp is truncated: 10 bytes, .metadata needs at least",
}
for _name, _rx in DAMAGE.items():
    for _cmd in COMMANDS_READING_CHECKPOINTS:
        CASES.append((f"damaged-{_name}-{_cmd}", _reader_argv(_cmd, f"{{S}}/damaged/{_name}"), _rx))
for _what, _rx in (("common", r"^error: refusing to read .*common.pt: it is not plain checkpoint data \(it names (io|builtins).open"),
                   ("metadata", r"^error: refusing to read .*\.metadata: it is not plain checkpoint data \(it names (io|builtins).open"),
                   ("numpy_object", r"^error: refusing to read .*common.pt: it is not plain checkpoint data \(it names numpy\.")):
    for _cmd in COMMANDS_READING_CHECKPOINTS:
        CASES.append((f"trapped-{_what}-{_cmd}", _reader_argv(_cmd, f"{{S}}/trapped/{_what}"), _rx))


def run_case(argv, sandbox):
    """(exit status, stdout, stderr) of ``megatron-staged ARGV`` run in this process."""
    from megatron_staged.cli import main

    argv = [a.replace("{S}", sandbox) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def snapshot(root):
    """Every path under ``root`` with its size and modification time (ns)."""
    snap = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            snap[os.path.relpath(p, root)] = (st.st_size if n in files else -1, st.st_mtime_ns)
    return snap


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_checkpoint):
    return build_sandbox(str(tmp_path_factory.mktemp("bad_inputs") / "sandbox"), str(tiny_checkpoint))


def test_catalogue_size():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, sandbox):
    import re

    name, argv, pattern = case
    before = snapshot(sandbox)
    rc, out, err = run_case(argv, sandbox)
    lines = err.strip().splitlines()
    assert rc == 2, f"{name}: exit status {rc}\nstdout: {out}\nstderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: not one error line:\n{err}"
    assert re.search(pattern, lines[0]), f"{name}: {lines[0]!r} does not match {pattern!r}"
    assert not os.path.exists(os.path.join(sandbox, MARKER)), f"{name}: a checkpoint's pickle ran code"
    assert snapshot(sandbox) == before, f"{name}: files changed"


def test_traps_are_live(sandbox, tmp_path):
    """The booby-trapped files do run code when unpickled the unsafe way (so the tests above mean something)."""
    import pickle

    import torch

    marker = os.path.join(sandbox, MARKER)
    for path in (os.path.join(sandbox, "trapped", "metadata", "iter_0000002", ".metadata"),):
        with open(path, "rb") as fh:
            pickle.load(fh)
        assert os.path.exists(marker)
        os.remove(marker)
    torch.load(os.path.join(sandbox, "trapped", "common", "iter_0000002", "common.pt"), weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)


def test_dcp_byte_entries_are_read_as_data(tmp_path):
    """torch DCP reads byte entries (RNG state, _extra_state) with torch.load(weights_only=False); inside
    untrusted_checkpoint_reads that load is forced to weights_only and a trap is refused."""
    import io as _io

    import torch

    from megatron_staged.checkpoint.safe_load import untrusted_checkpoint_reads

    marker = tmp_path / "ran"
    buf = _io.BytesIO()
    torch.save({"rng": _Trap(str(marker))}, buf)
    with untrusted_checkpoint_reads():
        buf.seek(0)
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            torch.load(buf, weights_only=False)  # what torch DCP's DefaultLoadPlanner.load_bytes calls
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ or os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] != "1"


def test_common_pt_with_a_numpy_rng_state_is_read(sandbox):
    """numpy's RNG state (a tuple with a uint32 array, as older checkpoints and Megatron-LM's hold it) is
    data: allow-listed (numpy's _reconstruct, ndarray, dtype) for our loads only, and only while they run."""
    import numpy as np
    import torch

    import megatron.core.safe_globals  # noqa: F401  (megatron-core's own process-wide registrations, at import)
    from megatron_staged.checkpoint.global_tensors import read_common

    before = list(torch.serialization.get_safe_globals())
    rc, out, err = run_case(["inspect", "{S}/numpy_rng", "--json"], sandbox)
    assert rc == 0 and "error" not in err, err
    assert json.loads(out)["iteration"] == 2
    state = read_common(os.path.join(sandbox, "numpy_rng", "iter_0000002"))["rng_state"][0]["np_rng_state"]
    assert isinstance(state[1], np.ndarray) and state[1].dtype == np.uint32 and len(state[1]) == 624
    # the allow-list is scoped to our loads: nothing of ours stays (torch registers its own classes as
    # their modules are first imported, which a load may do)
    added = [g for g in torch.serialization.get_safe_globals() if g not in before]
    assert all(getattr(g, "__module__", "").startswith("torch.") for g in added), added
    # torch's own default (a process without megatron-core's registrations) refuses the file: the read
    # above is our allow-list's doing (first on the args Namespace, Megatron-LM's format)
    path = os.path.join(sandbox, "numpy_rng", "iter_0000002", "common.pt")
    r = subprocess.run([sys.executable, "-c", f"import torch; torch.load({path!r}, weights_only=True)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and re.search("Unsupported global: GLOBAL (numpy|argparse)", r.stderr), r.stderr[-2000:]


def test_catalogue_fails_before_megatron(sandbox):
    """All cases again in one fresh process: same results, and megatron-core was never imported."""
    r = subprocess.run([sys.executable, __file__, sandbox], cwd=str(ROOT), env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["megatron_imported"] is False, f"megatron was imported (first by case {res['first_megatron_case']})"
    bad = {k: v for k, v in res["results"].items() if v != 2}
    assert not bad, bad


if __name__ == "__main__":
    sandbox_dir = sys.argv[1]
    results, first = {}, None
    for name, argv, _ in CASES:
        results[name] = run_case(argv, sandbox_dir)[0]
        if first is None and any(m.startswith("megatron.core") for m in sys.modules):
            first = name
    print(json.dumps({"results": results, "megatron_imported": first is not None, "first_megatron_case": first}))


def test_nccl_backend_without_cuda_is_one_line(monkeypatch, tmp_path):
    """Found as a new user: `--distributed-backend nccl` (Megatron-LM's default, pasted from a GPU
    script) on a machine without CUDA was torch's RuntimeError traceback from init_process_group."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = run_case(["train", *T, "--distributed-backend", "nccl"], str(tmp_path))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --distributed-backend nccl needs CUDA") and "gloo" in lines[0]
    rc, _, err = run_case(["train", *T, "--distributed-backend", "gloo", "--lr", "-1"], str(tmp_path))
    assert rc == 2 and "--lr -1.0 must be positive" in err  # gloo passes this check (the next one fails)
