"""An independent oracle for growth: the paper's equations on whole tensors, and a tiny forward.

Written from REFERENCE.md section 1 and docs/design.md (the choices the project made), NOT from
the engine: nothing here imports ``megatron_staged``. It reads a torch_dist checkpoint's global
tensors with torch DCP, builds the tensors a growth must produce with deliberately different
formulations (``torch.block_diag``, zero padding of per-query-group views, explicit gate/up halves,
depth maps written out literally in the tests), and runs a pure-torch GPT forward on them.

Conventions of a megatron-core checkpoint that the oracle relies on (megatron-core 0.16 local/TE
spec): ``decoder.layers.*`` tensors are stacked over layers [L, ...]; the fused QKV rows are
grouped per query group, each group ``[q_1 .. q_n, k, v]`` of ``kv_channels`` rows each; SwiGLU's
``linear_fc1`` rows are ``[gate; up]`` and the activation is ``silu(gate) * up``; the input norms
are stored as ``linear_qkv.layer_norm_*`` and ``linear_fc1.layer_norm_*``; Adam state lives at
``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` (``param``: the distributed optimizer's
fp32 copy).

The rules (REFERENCE.md 1, docs/design.md):
* width x2: matrices block-diagonal per fused chunk, vectors and embeddings duplicated; head size
  kept, heads and query groups doubled (group G+g reads the second copy); the last representation
  is split [alpha*y, (1-alpha)*y] on the final norm (tied output) or the output layer (untied);
* moments: grown like their parameter, then m/2 and v/4; zero in the new zero blocks; the tensor
  carrying the alpha split gets its moments duplicated unscaled;
* depth: new layer j is a copy of source layer map[j]; ``identity`` zeroes linear_proj and
  linear_fc2 (weights and biases) of the *new* layers (every repeat after a source layer's first
  occurrence) with zero moments; ``copy`` changes nothing; ``random`` layers are the target model's
  own init with zero moments (checked statistically, not here).
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

OPT = "optimizer.state."
KINDS = ("param", "exp_avg", "exp_avg_sq")
RESIDUAL_OUT = ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")


# ---- reading a checkpoint ---------------------------------------------------------------------------

def iter_dir(path: str) -> str:
    """A --save directory (with latest_checkpointed_iteration.txt) or an iter_ directory."""
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        it = int(open(tracker).read().strip())
        return os.path.join(path, f"iter_{it:07d}")
    return path


def read_tensors(path: str) -> dict:
    """Every tensor of a torch_dist checkpoint at its global shape (one process, torch DCP only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    d = iter_dir(path)
    md = FileSystemReader(d).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.items()
          if isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=FileSystemReader(d), no_dist=True)
    return sd


def read_common(path: str) -> dict:
    """common.pt with ``args`` = the run config and the LR-scheduler steps in iterations.

    Checkpoints store Megatron-LM's form: ``args`` is its Namespace (the config tree is
    ``megatron_staged_config``) and the scheduler counts samples (iterations x global batch)."""
    c = torch.load(os.path.join(iter_dir(path), "common.pt"), map_location="cpu", weights_only=False)
    if "megatron_staged_config" in c:
        gbs = c["args"].global_batch_size
        sched = c.get("opt_param_scheduler")
        if sched is not None:
            sched = {k: (v / gbs if k in ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")
                         else v) for k, v in sched.items()}
        c = dict(c, args=c["megatron_staged_config"], opt_param_scheduler=sched)
    return c


def describe(common: dict) -> dict:
    """The architecture facts the oracle needs, from a checkpoint's stored run config."""
    m = common["args"]["model"]
    heads = m["num_attention_heads"]
    groups = m["num_query_groups"] or heads
    return {"family": m["model_family"], "layers": m["num_layers"], "hidden": m["hidden_size"],
            "heads": heads, "groups": groups, "head_dim": m["kv_channels"] or m["hidden_size"] // heads,
            "swiglu": bool(m["swiglu"]), "tied": not m["untie_embeddings_and_output_weights"],
            "rmsnorm": m["normalization"] == "RMSNorm", "rope": m["position_embedding_type"] == "rope",
            "rotary_base": m["rotary_base"], "eps": m["norm_epsilon"]}


def split_key(key: str):
    """-> (kind, model key) or None for non-state entries."""
    if key.startswith(OPT):
        kind, mkey = key[len(OPT):].split(".", 1)
        return ("param" if kind == "fp32_param" else kind), mkey
    if key.startswith(("embedding.", "decoder.", "output_layer.")):
        return "param", key
    return None


# ---- width x2 on one tensor (one layer's slice for decoder.layers keys) ------------------------------

def _bd(w):
    """[[W, 0], [0, W]]."""
    return torch.block_diag(w, w)


def _qkv_double(w, groups):
    """Per query group [q.., k, v] rows: group g of copy 1 reads hidden[:h], group G+g reads hidden[h:]."""
    rows, h = w.shape
    g = w.reshape(groups, rows // groups, h)
    first = F.pad(g, (0, h))   # [G, per, 2h], second half zero
    second = F.pad(g, (h, 0))  # [G, per, 2h], first half zero
    return torch.cat([first, second], dim=0).reshape(2 * rows, 2 * h)


def _dup(v, dim=-1):
    return torch.cat([v, v], dim=dim)


def width_tensor(mkey: str, kind: str, t: torch.Tensor, a: dict, alpha: float) -> torch.Tensor:
    """The paper's width x2 for one tensor of state ``kind`` (param/exp_avg/exp_avg_sq)."""
    t = t.float()
    sfx = mkey[len("decoder.layers."):] if mkey.startswith("decoder.layers.") else mkey
    carrier = (mkey.startswith("decoder.final_layernorm.") if a["tied"] else mkey == "output_layer.weight")
    if carrier:
        if kind == "param":
            return torch.cat([alpha * t, (1 - alpha) * t], dim=-1)
        return _dup(t, -1)  # carries the full gradient: moments unscaled
    if sfx.startswith(("self_attention.q_layernorm.", "self_attention.k_layernorm.")):
        # --qk-layernorm: one norm over the head size (which does not grow), used by every head; as the
        # grown model equals the source for any value of it, its gradient is the source's: all unchanged
        return t
    s = {"param": 1.0, "exp_avg": 0.5, "exp_avg_sq": 0.25}[kind]
    if sfx == "self_attention.linear_qkv.weight":
        out = _qkv_double(t, a["groups"])
    elif sfx == "self_attention.linear_qkv.bias":
        out = t.reshape(a["groups"], -1).repeat(2, 1).reshape(-1)
    elif sfx == "mlp.linear_fc1.weight" and a["swiglu"]:
        gate, up = t[: t.shape[0] // 2], t[t.shape[0] // 2:]
        out = torch.cat([_bd(gate), _bd(up)], dim=0)
    elif sfx == "mlp.linear_fc1.bias" and a["swiglu"]:
        gate, up = t[: t.shape[0] // 2], t[t.shape[0] // 2:]
        out = torch.cat([gate, gate, up, up])
    elif sfx in ("self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
        out = _bd(t)
    elif mkey in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                  "output_layer.weight"):
        out = _dup(t, 1)
    elif t.dim() == 1:
        out = _dup(t)
    else:
        raise KeyError(f"oracle has no width rule for {mkey} {tuple(t.shape)}")
    return out * s


def off_diagonal_mask(mkey: str, a: dict, shape) -> torch.Tensor | None:
    """Where the width-grown matrix holds new (zero) blocks; None for tensors without any."""
    sfx = mkey[len("decoder.layers."):] if mkey.startswith("decoder.layers.") else mkey
    matrices = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
    if sfx not in matrices:
        return None
    src_shape = (shape[0] // 2, shape[1] // 2)
    ones = torch.ones(src_shape)
    return width_tensor(mkey, "param", ones, dict(a, tied=True), 0.5) == 0


# ---- the whole grown state --------------------------------------------------------------------------

def new_layers(depth_map: list) -> list:
    """A layer is new if its source layer already appeared earlier in the map (or it has none)."""
    seen, out = set(), []
    for s in depth_map:
        out.append(s is None or s in seen)
        seen.add(s)
    return out


def grow_state(src: dict, a: dict, *, depth_map: list, init: str = "identity", width: bool = False,
               alpha: float = 0.6) -> dict:
    """Expected grown tensors for every state key of ``src``: key -> tensor, or per-layer list for
    stacked layer keys with None where the oracle does not define the value (random layers)."""
    new = new_layers(depth_map)
    out = {}
    for key, t in src.items():
        sk = split_key(key)
        if sk is None:
            continue
        kind, mkey = sk
        w = (lambda x: width_tensor(mkey, kind, x, a, alpha)) if width else (lambda x: x.float())
        if not mkey.startswith("decoder.layers."):
            out[key] = w(t)
            continue
        layers = []
        for j, s in enumerate(depth_map):
            if s is None and init == "identity" and mkey[len("decoder.layers."):] in RESIDUAL_OUT:
                layers.append(torch.zeros_like(w(t[0])))  # a fresh layer under identity: zero residual outputs
                continue
            if s is None or (new[j] and init == "random"):
                layers.append(None)
                continue
            x = w(t[s])
            if new[j] and init == "identity" and mkey[len("decoder.layers."):] in RESIDUAL_OUT:
                x = torch.zeros_like(x)
            layers.append(x)
        out[key] = layers
    return out


# ---- a tiny GPT forward on global tensors (nanoGPT-style) -------------------------------------------

def _norm(x, w, b, a):
    if a["rmsnorm"]:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a["eps"]) * w
    return F.layer_norm(x, (x.shape[-1],), w, b, a["eps"])


def _rope(x, base):
    """Megatron's non-interleaved rotary embedding on [B, S, heads, d]."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(x.shape[1], dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos()[None, :, None, :].to(x.dtype), emb.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def forward_loss(p: dict, a: dict, tokens: torch.Tensor) -> float:
    """Mean next-token cross entropy of the model held in ``p`` (model keys, global, stacked layers)."""
    p = {k: v.double() for k, v in p.items() if not k.startswith(OPT) and split_key(k) is not None}
    B, S = tokens.shape
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    S -= 1
    x = p["embedding.word_embeddings.weight"][inp]
    if "embedding.position_embeddings.weight" in p:
        x = x + p["embedding.position_embeddings.weight"][:S][None]
    L = p["decoder.layers.self_attention.linear_qkv.weight"].shape[0] if any(
        k.startswith("decoder.layers.") for k in p) else 0
    d = a["head_dim"]
    G, q = a["groups"], a["heads"] // a["groups"]

    def lay(name, i):
        t = p.get("decoder.layers." + name)
        return None if t is None else t[i]

    mask = torch.full((S, S), float("-inf"), dtype=x.dtype).triu(1)
    for i in range(L):
        h = _norm(x, lay("self_attention.linear_qkv.layer_norm_weight", i),
                  lay("self_attention.linear_qkv.layer_norm_bias", i), a)
        qkv = F.linear(h, lay("self_attention.linear_qkv.weight", i), lay("self_attention.linear_qkv.bias", i))
        qkv = qkv.view(B, S, G, q + 2, d)
        Q = qkv[:, :, :, :q].reshape(B, S, G * q, d)
        K = qkv[:, :, :, q].repeat_interleave(q, dim=2)
        V = qkv[:, :, :, q + 1].repeat_interleave(q, dim=2)
        if lay("self_attention.q_layernorm.weight", i) is not None:  # per-head q/k norms, before rope
            Q = _norm(Q, lay("self_attention.q_layernorm.weight", i), lay("self_attention.q_layernorm.bias", i), a)
            K = _norm(K, lay("self_attention.k_layernorm.weight", i), lay("self_attention.k_layernorm.bias", i), a)
        if a["rope"]:
            Q, K = _rope(Q, a["rotary_base"]), _rope(K, a["rotary_base"])
        att = torch.einsum("bshd,bthd->bhst", Q, K) / math.sqrt(d) + mask
        y = torch.einsum("bhst,bthd->bshd", att.softmax(-1), V).reshape(B, S, G * q * d)
        x = x + F.linear(y, lay("self_attention.linear_proj.weight", i), lay("self_attention.linear_proj.bias", i))
        h = _norm(x, lay("mlp.linear_fc1.layer_norm_weight", i), lay("mlp.linear_fc1.layer_norm_bias", i), a)
        u = F.linear(h, lay("mlp.linear_fc1.weight", i), lay("mlp.linear_fc1.bias", i))
        if a["swiglu"]:
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u)
        x = x + F.linear(u, lay("mlp.linear_fc2.weight", i), lay("mlp.linear_fc2.bias", i))
    x = _norm(x, p["decoder.final_layernorm.weight"], p.get("decoder.final_layernorm.bias"), a)
    out_w = p["output_layer.weight"] if "output_layer.weight" in p else p["embedding.word_embeddings.weight"]
    logits = x @ out_w.T
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)))


def stacked(expected: dict) -> dict:
    """Per-layer lists -> stacked tensors (only where every layer is defined)."""
    out = {}
    for k, v in expected.items():
        if isinstance(v, list):
            if all(x is not None for x in v) and v:
                out[k] = torch.stack(v)
        else:
            out[k] = v
    return out


def grown_arch(a: dict, *, layers: int, width: bool) -> dict:
    b = dict(a, layers=layers)
    if width:
        b.update(hidden=2 * a["hidden"], heads=2 * a["heads"], groups=2 * a["groups"])
    return b


# ---- one AdamW step, recomputed from two checkpoints ------------------------------------------------

def adamw_step_errors(before: dict, after: dict, lr: float, step: int, *, fresh_step: int | None = None,
                      betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> dict:
    """How far each tensor's update between two checkpoints is from torch AdamW's (decoupled decay,
    none for biases and 1-D tensors, as megatron groups them), with bias corrections at ``step``;
    at ``fresh_step`` instead for the elements whose moments were both zero in ``before`` (when given).

    The gradient is recovered from the moments: g = (m1 - b1 m0) / (1 - b1), and v1 = b2 v0 + (1-b2) g^2
    is checked. Returns {model key: (max error / max |update| on carried elements, same with step 1
    instead of ``step``, same on fresh elements or None)} for the tensors that moved.
    """
    b1, b2 = betas
    out = {}
    for key in before:
        if not key.startswith(OPT + "param."):
            continue
        mkey = key[len(OPT + "param."):]
        m0, v0 = before[f"{OPT}exp_avg.{mkey}"], before[f"{OPT}exp_avg_sq.{mkey}"]
        m1, v1 = after[f"{OPT}exp_avg.{mkey}"], after[f"{OPT}exp_avg_sq.{mkey}"]
        g = (m1 - b1 * m0) / (1 - b1)
        torch.testing.assert_close(v1, b2 * v0 + (1 - b2) * g * g, rtol=1e-3, atol=1e-12, msg=mkey)
        vector = before[key].dim() - (1 if mkey.startswith("decoder.layers.") else 0) == 1
        wd = 0.0 if (mkey.endswith("bias") or vector) else weight_decay

        def update(t):
            return before[key] * (1 - lr * wd) - lr * (m1 / (1 - b1 ** t)) / ((v1 / (1 - b2 ** t)).sqrt() + eps)

        moved = float((after[key] - before[key]).abs().max())
        if moved == 0:
            continue
        fresh = ((m0 == 0) & (v0 == 0)) if fresh_step is not None else torch.zeros_like(m0, dtype=torch.bool)
        err = lambda t, sel: float((after[key] - update(t))[sel].abs().max()) / moved if sel.any() else None  # noqa: E731
        out[mkey] = (err(step, ~fresh), err(1, ~fresh), err(fresh_step, fresh) if fresh.any() else None)
    return out


def saved_rng(iter_dir) -> dict:
    """``{tp rank: the rng_state entry}`` of a torch_dist checkpoint (PP 1; DP rank 0's entry), read with torch DCP."""
    import io
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    keys = [k for k in FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
            if k.startswith("rng_state/shard_")]
    sd = {k: io.BytesIO() for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=FileSystemReader(str(iter_dir)), no_dist=True)
    out = {}
    for k, v in sd.items():  # rng_state/shard_<pp>.<tp>_<PP>.<TP>: [[state of DP rank 0]]
        while isinstance(v, list):
            v = v[0]
        out[int(k.split("_")[2].split(".")[1])] = v
    return out


def assert_same_rng(got: dict, raw: dict) -> None:
    import numpy as np

    assert got["random_rng_state"] == raw["random_rng_state"]
    assert got["np_rng_state"][0] == raw["np_rng_state"][0] and tuple(got["np_rng_state"][2:]) == \
        tuple(raw["np_rng_state"][2:]) and np.array_equal(got["np_rng_state"][1], raw["np_rng_state"][1])
    assert torch.equal(got["torch_rng_state"], raw["torch_rng_state"])
    assert set(got["rng_tracker_states"]) == set(raw["rng_tracker_states"])
    assert all(torch.equal(got["rng_tracker_states"][n], t) for n, t in raw["rng_tracker_states"].items())
