"""Llama.from_pretrained: dtypes, formats, and a clear error for every kind of bad folder."""

import json
import shutil

import pytest
import torch
from helpers import hf_llama
from safetensors.torch import load_file, save_file

from apt_min.checkpoint import CheckpointError
from apt_min.llama import Llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return hf_llama(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def folder(saved, tmp_path):
    """A private copy of the saved model that a test may damage."""
    return shutil.copytree(saved[1], tmp_path / "model")


def _shard_holding(folder, key):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / index[key]


def _edit_shard(folder, key, edit):
    shard = _shard_holding(folder, key)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                             (torch.float32, torch.float32), ("auto", torch.float32)])
def test_loads_in_requested_dtype(saved, dtype, expected):
    hf, folder = saved
    model = Llama.from_pretrained(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    ref = hf.state_dict()["model.layers.1.mlp.up_proj.weight"].to(expected)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, ref)


def test_cast_in_small_pieces(saved, monkeypatch):
    import apt_min.checkpoint

    monkeypatch.setattr(apt_min.checkpoint, "READ_CHUNK", 1000)  # every matrix crosses several pieces
    hf, folder = saved
    model = Llama.from_pretrained(folder, dtype="bf16")
    for key, ref in hf.state_dict().items():
        assert torch.equal(model.state_dict()[key], ref.to(torch.bfloat16)), key


def test_single_file_and_pytorch_bin(saved, tmp_path):
    hf, folder = saved
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        ref = hf(ids).logits
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "config.json", one)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, one / "model.safetensors")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    shutil.copy(folder / "config.json", bin_)
    torch.save(hf.state_dict(), bin_ / "pytorch_model.bin")
    for f in (one, bin_):
        with torch.no_grad():
            assert (Llama.from_pretrained(f)(ids) - ref).abs().max() <= 1e-4


def test_old_rotary_tables_are_dropped_on_purpose(folder):
    _edit_shard(folder, "model.norm.weight", lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq":
                                                                  torch.ones(8)}))
    Llama.from_pretrained(folder)


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    _, folder = hf_llama(tmp_path, tied=True, shards=False)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors")
    model = Llama.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        Llama.from_pretrained(tmp_path / "nowhere")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        Llama.from_pretrained(folder)


def test_not_llama(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="not a Llama architecture"):
        Llama.from_pretrained(folder)


def test_no_weights(folder):
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        Llama.from_pretrained(folder)


def test_missing_shard(folder):
    shard = _shard_holding(folder, "model.norm.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"not there.*{shard.name}"):
        Llama.from_pretrained(folder)


def test_missing_key(folder):
    _edit_shard(folder, "model.layers.2.mlp.down_proj.weight", lambda t: t.pop("model.layers.2.mlp.down_proj.weight"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: v for k, v in json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].items()
        if k != "model.layers.2.mlp.down_proj.weight"}}))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.2\.mlp\.down_proj\.weight"):
        Llama.from_pretrained(folder)


def test_unexpected_key(folder):
    _edit_shard(folder, "model.norm.weight", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.0\.mlp\.extra\.weight"):
        Llama.from_pretrained(folder)


def test_wrong_shape(folder):
    key = "model.layers.1.self_attn.o_proj.weight"
    _edit_shard(folder, key, lambda t: t.update({key: torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: model\.layers\.1\.self_attn\.o_proj\.weight in "
                                              r"model-\d+-of-\d+\.safetensors: expected \(64, 64\), found \(64, 32\)"):
        Llama.from_pretrained(folder)


def test_truncated_shard(folder):
    shard = _shard_holding(folder, "model.embed_tokens.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        Llama.from_pretrained(folder)


def test_text_file_as_shard(folder):
    shard = _shard_holding(folder, "model.norm.weight")
    shard.write_text("this is not a tensor file")
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a safetensors file"):
        Llama.from_pretrained(folder)


def test_unknown_dtype(folder):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        Llama.from_pretrained(folder, dtype="float8")


def test_unsupported_rope(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        Llama.from_pretrained(folder)


def test_pickle_with_code_is_refused(folder):
    for f in folder.glob("*.safetensors*"):
        f.unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model.norm.weight": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip(tmp_path, tied):
    from transformers import LlamaForCausalLM

    _, folder = hf_llama(tmp_path / "src", tied=tied, kv_heads=2)
    ours = Llama.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "out")
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        again = Llama.from_pretrained(tmp_path / "out")(ids)
        theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
        assert torch.equal(again, ours(ids))
        assert (theirs - again).abs().max() <= 1e-4
