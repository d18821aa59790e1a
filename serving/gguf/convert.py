"""Hugging Face Llama/Mistral checkpoints -> GGUF files that llama.cpp runs.

``convert_hf_to_gguf`` reads a model directory (``config.json``, safetensors weights,
``tokenizer.json``) and writes one GGUF file for llama.cpp's ``llama`` architecture,
written here from the format's definitions with the ``gguf`` package's ``GGUFWriter``:

* hyper-parameters under ``llama.*``: context length, embedding length, block count,
  feed-forward length, head counts (query and key/value heads, so GQA models work),
  key/value head size, rope dimension count and frequency base (and linear rope
  scaling), RMS norm epsilon, vocabulary size; ``general.file_type``;
* the weights under llama.cpp's tensor names. The query and key projections are
  permuted: Hugging Face applies rope with ``rotate_half``, which pairs element ``i`` of
  a head with element ``i + head_dim/2``; GGML's normal rope pairs adjacent elements
  ``2i`` and ``2i + 1``. Both rotate pair ``i`` by the same angle, so moving row ``i``
  of each head to ``2i`` and row ``i + head_dim/2`` to ``2i + 1`` makes the rotations
  agree. The permutation is the same for queries and keys, so their dot products (the
  attention scores) are unchanged. With tied embeddings no ``output.weight`` is written
  (llama.cpp then reuses ``token_embd.weight``). ``out_type="f16"`` stores matrices as
  float16 and keeps the 1-D tensors (norms, biases) in float32; ``"f32"`` keeps all in
  float32;
* the tokenizer, from ``tokenizer.json``:

  - byte-level BPE (GPT-2 style ``ByteLevel`` pre-tokenizer with its regex, no
    normalizer) -> ``tokenizer.ggml.model = "gpt2"`` with the merges and the ``gpt-2``
    pre-tokenizer, whose regex is the one ``ByteLevel`` splits with;
  - SentencePiece-style BPE with byte fallback (Llama, Mistral: ``▁`` for spaces, a
    ``<0xXX>`` token per byte) -> ``tokenizer.ggml.model = "llama"``. llama.cpp merges
    such vocabularies by token score, highest first, so each token made by a merge gets
    the score ``-rank`` of its merge: earlier merges win, as in the BPE model.

  Special added tokens become control tokens, other added tokens (such as the chat
  role tags) user-defined tokens, which llama.cpp, like Hugging Face, never splits.
  BOS/EOS/UNK/PAD ids and whether BOS/EOS are added follow the tokenizer's
  post-processor, overridden by explicit ``add_bos_token``/``add_eos_token`` in
  ``tokenizer_config.json`` (as transformers' Llama tokenizers do);
* a chat template (``tokenizer.chat_template``) producing the project's chat format.

Anything else (other architectures, tokenizers or rope scalings, quantized or
``.bin``-only checkpoints) is refused with a ``ConversionError`` that names it. Mistral's
sliding window is not written: llama.cpp's ``llama`` architecture attends over the
whole context, which equals the sliding window for contexts no longer than it.

The file is written under a temporary name in the output directory and renamed into
place when complete, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corpusfactory.chatformat import ChatFormat
from corpusfactory.errors import ConversionError

log = logging.getLogger(__name__)

ARCH = "llama"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
OUT_TYPES = ("f16", "f32")
SPIECE_SPACE = "▁"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

Json = dict[str, Any]


# -- the chat template -----------------------------------------------------------------


def chat_template(fmt: ChatFormat | None = None) -> str:
    """A Jinja chat template that renders messages as ``ChatFormat`` does.

    Each user/assistant message becomes ``TAG text`` (text stripped), turns are joined
    by newlines, and ``add_generation_prompt`` appends a newline and the assistant tag
    (as ``ChatFormat.prompt`` does). Other roles (system) are skipped: the format has
    none.
    """
    fmt = fmt or ChatFormat()
    user, assistant = json.dumps(fmt.user_tag), json.dumps(fmt.assistant_tag)
    return (
        "{%- set ns = namespace(first=true) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] in ['user', 'assistant'] -%}"
        "{%- if not ns.first %}{{ '\\n' }}{% endif -%}"
        f"{{%- if message['role'] == 'user' %}}{{{{ {user} }}}}"
        f"{{%- else %}}{{{{ {assistant} }}}}{{%- endif -%}}"
        "{{ ' ' + (message['content'] | trim) }}"
        "{%- set ns.first = false -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if not ns.first %}{{ '\\n' }}{% endif -%}"
        f"{{{{ {assistant} }}}}"
        "{%- endif -%}"
    )


# -- reading the checkpoint ------------------------------------------------------------


def _read_json(path: Path, what: str) -> Json:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConversionError(f"{path.parent}: no {path.name} ({what})") from exc
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: {what} is not a JSON object")
    return data


@dataclass(frozen=True)
class _HParams:
    hf_architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    notes: tuple[str, ...] = ()


def _rope(config: Json) -> tuple[float, float | None]:
    """(rope theta, linear scaling factor or None) from either config layout."""
    params = config.get("rope_parameters")
    theta: Any
    scaling: Json | None
    if isinstance(params, dict):  # transformers >= 5
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), float(scaling["factor"])
    raise ConversionError(
        f"unsupported rope scaling {kind!r}: the converter writes default and linear rope"
    )


def _hparams(model_dir: Path, config: Json) -> _HParams:
    archs = config.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch not in SUPPORTED_ARCHITECTURES:
        found = ", ".join(map(str, archs)) or f"model_type {config.get('model_type')!r}"
        raise ConversionError(
            f"{model_dir}: unsupported architecture {found}: the GGUF converter supports "
            f"{' and '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("quantization_config"):
        raise ConversionError(f"{model_dir}: the checkpoint is quantized; convert the full model")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{model_dir}: unsupported activation {act!r} (llama uses silu)")
    rotary = config.get("partial_rotary_factor", 1.0)
    rope_params = config.get("rope_parameters")
    if isinstance(rope_params, dict):
        rotary = rope_params.get("partial_rotary_factor", rotary)
    if rotary != 1.0:
        raise ConversionError(f"{model_dir}: unsupported partial rotary factor {rotary}")
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        n_head_kv = int(config.get("num_key_value_heads") or n_head)
        head_dim = int(config.get("head_dim") or n_embd // n_head)
        theta, linear = _rope(config)
        hp = _HParams(
            hf_architecture=arch,
            n_vocab=int(config["vocab_size"]),
            n_embd=n_embd,
            n_layer=int(config["num_hidden_layers"]),
            n_ff=int(config["intermediate_size"]),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ctx=int(config["max_position_embeddings"]),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_linear_factor=linear,
            tied=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            notes=_notes(config),
        )
    except KeyError as exc:
        raise ConversionError(f"{model_dir}/config.json: missing {exc.args[0]!r}") from exc
    if n_head % n_head_kv or head_dim % 2:
        raise ConversionError(
            f"{model_dir}: {n_head} query heads, {n_head_kv} key/value heads and head size "
            f"{head_dim} do not fit (heads must be a multiple of KV heads, head size even)"
        )
    return hp


def _notes(config: Json) -> tuple[str, ...]:
    window = config.get("sliding_window")
    n_ctx = config.get("max_position_embeddings")
    if window and isinstance(n_ctx, int) and window < n_ctx:
        return (
            f"sliding window {window} not written: llama.cpp attends over the whole "
            f"context, the same as the model up to {window} tokens",
        )
    return ()


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: no weight_map")
        return {name: model_dir / str(file) for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), single)
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
        raise ConversionError(
            f"{model_dir}: only PyTorch pickles found; the converter reads safetensors "
            "(save the model with save_pretrained(safe_serialization=True))"
        )
    raise ConversionError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


# -- tensors -------------------------------------------------------------------------


def permute_for_ggml_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of each head from rotate_half pairs to adjacent pairs.

    Within a head of size d, row ``s * d/2 + i`` (``s`` in 0, 1) moves to ``2i + s``:
    the pair (i, i + d/2) that Hugging Face rotates together becomes the pair
    (2i, 2i + 1) that GGML's normal rope rotates. Works for weights and biases.
    """
    rows = weight.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ConversionError(f"cannot split {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(weight.shape).copy()


@dataclass(frozen=True)
class _Plan:
    name: str  # GGUF name
    source: str  # HF name
    shape: tuple[int, ...]  # numpy order
    dtype: np.dtype[Any]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _tensor_map(hp: _HParams) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]]:
    """HF name -> (GGUF name, transform) for every tensor the model may hold."""
    import gguf

    def tn(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
        base = gguf.TENSOR_NAMES[kind]
        return f"{base.format(bid=bid) if bid is not None else base}.{suffix}"

    def q_perm(w: np.ndarray) -> np.ndarray:
        return permute_for_ggml_rope(w, hp.n_head)

    def k_perm(w: np.ndarray) -> np.ndarray:
        return permute_for_ggml_rope(w, hp.n_head_kv)

    T = gguf.MODEL_TENSOR
    out: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]] = {
        "model.embed_tokens.weight": (tn(T.TOKEN_EMBD), None),
        "model.norm.weight": (tn(T.OUTPUT_NORM), None),
        "lm_head.weight": (tn(T.OUTPUT), None),
    }
    # (HF module, GGUF tensor, transform, may have a bias): the biases llama.cpp loads.
    per_layer: list[tuple[str, gguf.MODEL_TENSOR, Any, bool]] = [
        ("input_layernorm", T.ATTN_NORM, None, False),
        ("self_attn.q_proj", T.ATTN_Q, q_perm, True),
        ("self_attn.k_proj", T.ATTN_K, k_perm, True),
        ("self_attn.v_proj", T.ATTN_V, None, True),
        ("self_attn.o_proj", T.ATTN_OUT, None, True),
        ("post_attention_layernorm", T.FFN_NORM, None, False),
        ("mlp.gate_proj", T.FFN_GATE, None, True),
        ("mlp.up_proj", T.FFN_UP, None, True),
        ("mlp.down_proj", T.FFN_DOWN, None, True),
    ]
    for i in range(hp.n_layer):
        for hf, kind, fn, has_bias in per_layer:
            out[f"model.layers.{i}.{hf}.weight"] = (tn(kind, i), fn)
            if has_bias:
                out[f"model.layers.{i}.{hf}.bias"] = (tn(kind, i, "bias"), fn)
    return out


def _required(hp: _HParams) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not hp.tied:
        names.append("lm_head.weight")
    for i in range(hp.n_layer):
        p = f"model.layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if hp.attention_bias:
            names += [f"{p}.self_attn.{x}_proj.bias" for x in "qkvo"]
        if hp.mlp_bias:
            names += [f"{p}.mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
    return names


def _plan(model_dir: Path, hp: _HParams, files: dict[str, Path], out_type: str) -> list[_Plan]:
    from safetensors import safe_open

    mapping = _tensor_map(hp)
    skipped = {n for n in files if n.endswith("rotary_emb.inv_freq")}
    if hp.tied:
        skipped.add("lm_head.weight")
    unknown = sorted(n for n in files if n not in mapping and n not in skipped)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConversionError(
            f"{model_dir}: unsupported tensors {', '.join(unknown[:5])}{more} "
            f"(not part of a {hp.hf_architecture})"
        )
    missing = [n for n in _required(hp) if n not in files]
    if missing:
        raise ConversionError(f"{model_dir}: missing tensors {', '.join(missing[:5])}")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    expected = {
        "model.embed_tokens.weight": (hp.n_vocab, hp.n_embd),
        "lm_head.weight": (hp.n_vocab, hp.n_embd),
    }
    plans: list[_Plan] = []
    order = list(mapping)  # embeddings, norm, output, then layer by layer
    for hf_name in order:
        if hf_name not in files or hf_name in skipped:
            continue
        shape = shapes[hf_name]
        want = expected.get(hf_name)
        if want is not None and shape != want:
            raise ConversionError(f"{model_dir}: {hf_name} has shape {shape}, expected {want}")
        gguf_name, fn = mapping[hf_name]
        dtype = np.dtype(np.float16 if out_type == "f16" and len(shape) >= 2 else np.float32)
        plans.append(_Plan(gguf_name, hf_name, shape, dtype, fn))
    return plans


def _load(fh: Any, name: str) -> np.ndarray:
    import torch

    return fh.get_tensor(name).to(torch.float32).numpy()


# -- the tokenizer ---------------------------------------------------------------------


@dataclass
class _Vocab:
    kind: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _describe(node: Any) -> str:
    if not isinstance(node, dict):
        return "none"
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return "Sequence[" + ", ".join(_describe(n) for n in inner) + "]"
    if node.get("type") == "Split":
        return f"Split({json.dumps(node.get('pattern'), ensure_ascii=False)})"
    return str(node.get("type"))


def _flat(node: Any, key: str) -> list[Json]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [n for n in node.get(key) or [] if isinstance(n, dict)]
    return [node]


def _tokenizer_kind(tj: Json, where: Path) -> tuple[str, bool | None]:
    """("gpt2" | "llama", add_space_prefix) or a ConversionError naming what is unsupported."""
    model = tj.get("model") or {}
    mtype = model.get("type")
    if mtype != "BPE":
        raise ConversionError(
            f"{where}: unsupported tokenizer model {mtype!r}: the converter supports "
            "byte-level BPE and SentencePiece-style BPE with byte fallback"
        )
    pre, norm = tj.get("pre_tokenizer"), tj.get("normalizer")
    pres = _flat(pre, "pretokenizers")
    norms = _flat(norm, "normalizers")
    if not model.get("byte_fallback"):
        if len(pres) != 1 or pres[0].get("type") != "ByteLevel" or norms:
            raise ConversionError(
                f"{where}: unsupported BPE tokenizer (pre-tokenizer {_describe(pre)}, "
                f"normalizer {_describe(norm)}): byte-level BPE needs a lone ByteLevel "
                "pre-tokenizer (GPT-2 regex) and no normalizer"
            )
        if not pres[0].get("use_regex", True) or pres[0].get("add_prefix_space", False):
            raise ConversionError(
                f"{where}: unsupported ByteLevel options (use_regex="
                f"{pres[0].get('use_regex', True)}, add_prefix_space="
                f"{pres[0].get('add_prefix_space', False)}): llama.cpp's gpt-2 "
                "pre-tokenizer splits with the GPT-2 regex and adds no prefix space"
            )
        return "gpt2", None
    # SentencePiece style: spaces as U+2581, optionally one prepended.
    if pre is None:
        kinds = [n.get("type") for n in norms]
        prepend = [n for n in norms if n.get("type") == "Prepend"]
        replace = [n for n in norms if n.get("type") == "Replace"]
        ok_replace = len(replace) == 1 and replace[0].get("pattern") == {"String": " "}
        ok_replace = ok_replace and replace[0].get("content") == SPIECE_SPACE
        ok_prepend = all(n.get("prepend") == SPIECE_SPACE for n in prepend)
        if ok_replace and ok_prepend and kinds in (["Prepend", "Replace"], ["Replace"]):
            return "llama", bool(prepend)
    elif not norms and len(pres) == 1 and pres[0].get("type") == "Metaspace":
        meta = pres[0]
        scheme = meta.get("prepend_scheme")
        if scheme is None:
            scheme = "always" if meta.get("add_prefix_space", True) else "never"
        if meta.get("replacement") == SPIECE_SPACE and not meta.get("split", False):
            return "llama", scheme != "never"
    raise ConversionError(
        f"{where}: unsupported byte-fallback BPE tokenizer (pre-tokenizer {_describe(pre)}, "
        f"normalizer {_describe(norm)}): SentencePiece-style BPE needs spaces replaced by "
        f"{SPIECE_SPACE!r} (Prepend+Replace normalizers or a non-splitting Metaspace)"
    )


def _post_processor_flags(
    node: Any, bos: str | None, eos: str | None, where: Path
) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) for a single sequence, from the post-processor."""
    add_bos = add_eos = False
    for proc in _flat(node, "processors"):
        ptype = proc.get("type")
        if ptype == "ByteLevel":
            continue
        if ptype != "TemplateProcessing":
            raise ConversionError(f"{where}: unsupported post-processor {ptype!r}")
        single = proc.get("single") or []
        specials = [
            (i, item["SpecialToken"]["id"])
            for i, item in enumerate(single)
            if "SpecialToken" in item
        ]
        for i, tok in specials:
            if i == 0 and tok == bos:
                add_bos = True
            elif i == len(single) - 1 and tok == eos:
                add_eos = True
            else:
                raise ConversionError(
                    f"{where}: the post-processor adds {tok!r} at position {i}; llama.cpp "
                    "can only add BOS first and EOS last"
                )
    return add_bos, add_eos


def _merges(model: Json) -> list[str]:
    out: list[str] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2:
            a, b = m
            if " " in a or " " in b:
                raise ConversionError(f"merge {m!r} holds a space; GGUF merges cannot express it")
            out.append(f"{a} {b}")
        else:
            raise ConversionError(f"malformed merge {m!r}")
    return out


def _vocab(model_dir: Path, config: Json, n_vocab: int) -> _Vocab:
    import gguf

    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ConversionError(
            f"{model_dir}: no tokenizer.json: the converter reads the tokenizer from "
            "tokenizer.json (save a fast tokenizer with save_pretrained)"
        )
    tj = _read_json(tok_path, "the tokenizer")
    kind, space_prefix = _tokenizer_kind(tj, tok_path)
    model = tj["model"]
    raw_vocab = model.get("vocab") or {}
    added = [a for a in tj.get("added_tokens") or [] if isinstance(a, dict)]
    by_id: dict[int, str] = {int(i): str(t) for t, i in raw_vocab.items()}
    for a in added:
        by_id[int(a["id"])] = str(a["content"])
    too_big = [i for i in by_id if i >= n_vocab or i < 0]
    if too_big:
        raise ConversionError(
            f"{tok_path}: token id {max(too_big)} is beyond the model's vocab_size {n_vocab}"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    dups = [t for t, n in Counter(tokens).items() if n > 1]
    if dups:
        raise ConversionError(f"{tok_path}: token {dups[0]!r} appears under two ids")
    for a in added:
        types[int(a["id"])] = (
            gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        )
    token_ids = {t: i for i, t in enumerate(tokens)}

    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path, "the tokenizer config") if tcfg_path.is_file() else {}
    smap_path = model_dir / "special_tokens_map.json"
    smap = _read_json(smap_path, "the special tokens") if smap_path.is_file() else {}
    special_ids: dict[str, int] = {}
    special_text: dict[str, str | None] = {}
    for role in ("bos", "eos", "unk", "pad"):
        text = _token_text(tcfg.get(f"{role}_token")) or _token_text(smap.get(f"{role}_token"))
        if role == "unk" and text is None:
            text = model.get("unk_token")
        special_text[role] = text
        if text is not None and text in token_ids:
            special_ids[role] = token_ids[text]
        elif isinstance(config.get(f"{role}_token_id"), int):
            special_ids[role] = int(config[f"{role}_token_id"])
            special_text[role] = tokens[special_ids[role]]

    add_bos, add_eos = _post_processor_flags(
        tj.get("post_processor"), special_text["bos"], special_text["eos"], tok_path
    )
    if isinstance(tcfg.get("add_bos_token"), bool):
        add_bos = bool(tcfg["add_bos_token"])
    if isinstance(tcfg.get("add_eos_token"), bool):
        add_eos = bool(tcfg["add_eos_token"])
    if add_bos and "bos" not in special_ids:
        raise ConversionError(f"{tok_path}: the tokenizer adds BOS but names no BOS token")
    if add_eos and "eos" not in special_ids:
        raise ConversionError(f"{tok_path}: the tokenizer adds EOS but names no EOS token")

    merges = _merges(model)
    vocab = _Vocab(
        kind=kind,
        pre="gpt-2" if kind == "gpt2" else None,
        tokens=tokens,
        types=types,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=space_prefix,
    )
    if kind == "gpt2":
        vocab.merges = merges
        return vocab
    # SentencePiece style: byte tokens, the unknown token, and scores from merge ranks.
    byte_ids = {int(m.group(1), 16): i for i, t in enumerate(tokens) if (m := _BYTE_TOKEN.match(t))}
    if len(byte_ids) != 256:
        raise ConversionError(
            f"{tok_path}: byte fallback needs the 256 tokens <0x00>..<0xFF>, found {len(byte_ids)}"
        )
    for i in byte_ids.values():
        types[i] = gguf.TokenType.BYTE
    if "unk" in special_ids:
        types[special_ids["unk"]] = gguf.TokenType.UNKNOWN
    scores = [0.0] * n_vocab
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        made = token_ids.get(left + right)
        if made is not None and scores[made] == 0.0:
            scores[made] = -float(rank + 1)
    vocab.scores = scores
    return vocab


# -- writing -------------------------------------------------------------------------


def _write_metadata(
    writer: Any, hp: _HParams, vocab: _Vocab, out_type: str, name: str, fmt: ChatFormat | None
) -> None:
    import gguf

    writer.add_name(name)
    writer.add_type("model")
    ftype = gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    if hp.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_linear_factor)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    writer.add_tokenizer_model(vocab.kind)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.types])
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    ids = vocab.special_ids
    if "bos" in ids:
        writer.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        writer.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        writer.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if fmt is not None:
        writer.add_chat_template(chat_template(fmt))


@contextlib.contextmanager
def atomic_target(out_path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``out_path``, renamed onto it if the block succeeds.

    The temporary file is created by whoever writes it (so it gets the usual
    permissions); it is removed if the block fails.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_hf_to_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    out_type: str = "f16",
    *,
    chat_format: ChatFormat | None = ChatFormat(),
    name: str | None = None,
) -> dict[str, Any]:
    """Convert a Hugging Face Llama/Mistral checkpoint to a GGUF file for llama.cpp.

    ``out_type`` is ``"f16"`` (matrices in float16, 1-D tensors in float32) or ``"f32"``.
    ``chat_format`` sets the chat template written to the metadata (None: none);
    ``name`` the ``general.name`` (default: the directory name). Returns what was
    written: ``architecture``, ``hf_architecture``, ``n_tensors``, ``n_params``,
    ``vocab_size``, ``tokenizer`` ("gpt2" or "llama"), ``tokenizer_pre``, ``add_bos``,
    ``add_eos``, ``out_type``, ``size_bytes``, ``path`` and ``notes``. Raises
    ``ConversionError`` for a checkpoint it does not support, naming what, and
    ``ValueError`` for an unknown ``out_type``.
    """
    import gguf
    from safetensors import safe_open

    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise ValueError(f"unknown out_type {out_type!r} (expected one of {', '.join(OUT_TYPES)})")
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a model directory")
    config = _read_json(model_dir / "config.json", "the model config")
    hp = _hparams(model_dir, config)
    vocab = _vocab(model_dir, config, hp.n_vocab)
    files = _weight_files(model_dir)
    plans = _plan(model_dir, hp, files, out_type)

    with atomic_target(out_path) as tmp:
        writer = gguf.GGUFWriter(None, ARCH)
        try:
            _write_metadata(writer, hp, vocab, out_type, name or model_dir.name, chat_format)
            for p in plans:
                nbytes = int(np.prod(p.shape)) * p.dtype.itemsize
                writer.add_tensor_info(p.name, p.shape, p.dtype, nbytes)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with contextlib.ExitStack() as stack:
                handles: dict[Path, Any] = {}
                for p in plans:
                    path = files[p.source]
                    if path not in handles:
                        handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                    data = _load(handles[path], p.source)
                    if p.transform is not None:
                        data = p.transform(data)
                    writer.write_tensor_data(np.ascontiguousarray(data.astype(p.dtype)))
        finally:
            writer.close()
    size = out_path.stat().st_size
    result = {
        "architecture": ARCH,
        "hf_architecture": hp.hf_architecture,
        "n_tensors": len(plans),
        "n_params": int(sum(int(np.prod(p.shape)) for p in plans)),
        "vocab_size": hp.n_vocab,
        "tokenizer": vocab.kind,
        "tokenizer_pre": vocab.pre,
        "add_bos": vocab.add_bos,
        "add_eos": vocab.add_eos,
        "out_type": out_type,
        "size_bytes": size,
        "path": str(out_path),
        "notes": list(hp.notes),
    }
    log.info(
        "converted %s -> %s (%s, %d tensors, %.1f MB)",
        model_dir,
        out_path,
        out_type,
        len(plans),
        size / 1e6,
    )
    return result
