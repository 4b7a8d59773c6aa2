"""Llama.from_pretrained: dtypes, formats, and a clear error for every kind of bad folder.

A load is checked bit for bit against transformers' weights; logits are compared in float64, within 1e-5 of their
scale (measured: 0.0; see test_llama.py for why 1e-5 and not less)."""

import copy
import json
import re
import shutil
import struct

import pytest
import torch
from helpers import assert_close_rel, hf_llama
from safetensors import safe_open
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


def _edit_index(folder, edit):
    file = folder / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    edit(index["weight_map"])
    file.write_text(json.dumps(index))


def _assert_is_reference(model, hf):
    """Every weight bit for bit the one transformers holds, and so its logits."""
    ref, got = hf.state_dict(), model.state_dict()
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        assert_close_rel(copy.deepcopy(model).double()(ids), copy.deepcopy(hf).double()(ids).logits, 1e-5)


def _save_bin_shards(hf, folder, n=2):
    """The layout transformers 4.x wrote: pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    state = hf.state_dict()
    keys = list(state)
    weight_map = {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = keys[i * len(keys) // n:(i + 1) * len(keys) // n]
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map |= dict.fromkeys(part, name)
    size = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                      "weight_map": weight_map}))


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), ("fp16", torch.float16),
                                             ("half", torch.float16), ("fp32", torch.float32),
                                             ("float32", torch.float32), (torch.float32, torch.float32),
                                             ("auto", torch.float32)])
def test_loads_in_requested_dtype(saved, dtype, expected):
    hf, folder = saved
    model = Llama.from_pretrained(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected} and not model.training  # frozen: in eval mode
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
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "config.json", one)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, one / "model.safetensors")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    shutil.copy(folder / "config.json", bin_)
    torch.save(hf.state_dict(), bin_ / "pytorch_model.bin")
    for f in (one, bin_):
        _assert_is_reference(Llama.from_pretrained(f), hf)


def test_sharded_pytorch_bin(saved, tmp_path):
    hf, folder = saved
    shutil.copy(folder / "config.json", tmp_path)
    _save_bin_shards(hf, tmp_path)
    _assert_is_reference(Llama.from_pretrained(tmp_path), hf)


def test_sharded_pytorch_bin_missing_shard(saved, tmp_path):
    hf, folder = saved
    shutil.copy(folder / "config.json", tmp_path)
    _save_bin_shards(hf, tmp_path)
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: lists shard files that are not "
                                              r"there: \['pytorch_model-00002-of-00002\.bin'\]"):
        Llama.from_pretrained(tmp_path)


def test_old_rotary_tables_are_dropped_on_purpose(saved, folder):
    """transformers < 4.31 saved each layer's rotary table (and listed it in the index): it is skipped, and nothing
    else in its shard is."""
    hf, _ = saved
    tables = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(3)}
    _edit_shard(folder, "model.norm.weight", lambda t: t.update(tables))
    shard = _shard_holding(folder, "model.norm.weight").name
    _edit_index(folder, lambda m: m.update(dict.fromkeys(tables, shard)))
    _assert_is_reference(Llama.from_pretrained(folder), hf)


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


def test_a_config_that_is_not_json_is_named(folder):
    (folder / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON \(Expecting"):
        Llama.from_pretrained(folder)


def test_not_llama(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="not a Llama architecture"):
        Llama.from_pretrained(folder)


def test_not_silu(folder):
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act='gelu'; Llama uses 'silu'"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("field", ["torch_dtype", "dtype"])  # transformers 4.x's spelling, 5.x's
def test_auto_takes_the_configs_dtype(folder, field):
    raw = json.loads((folder / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("torch_dtype", "dtype")}
    (folder / "config.json").write_text(json.dumps(raw | {field: "bfloat16"}))
    model = Llama.from_pretrained(folder, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_auto_takes_dtype_over_torch_dtype_as_transformers_does(folder):
    """A config.json holding both spellings, at odds: "dtype" (5.x's) wins, as transformers' own dtype="auto"
    reads it."""
    from transformers import LlamaForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"dtype": "bfloat16", "torch_dtype": "float16"}))
    theirs = LlamaForCausalLM.from_pretrained(folder, dtype="auto")
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    model = Llama.from_pretrained(folder, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def assert_fields_read_as_transformers_reads_them(ours, theirs):
    """Every field of our LlamaConfig equals transformers' of the same name (the rotary ones, which transformers 5
    folds into rope_parameters, aside)."""
    import dataclasses

    for field in (f.name for f in dataclasses.fields(ours) if not f.name.startswith("rope")):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_fields_a_config_leaves_out_take_transformers_defaults():
    """A config.json with only the shape: every other field as transformers' LlamaConfig fills it."""
    import transformers

    from apt_min.llama import LlamaConfig

    shape = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 160,
             "num_hidden_layers": 2, "num_attention_heads": 4}
    ours, theirs = LlamaConfig.from_dict(shape, "config.json"), transformers.LlamaConfig(**shape)
    assert_fields_read_as_transformers_reads_them(ours, theirs)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None
    # num_key_value_heads written as null is left out too: transformers fills it with the number of heads
    nulls = {**shape, "num_key_value_heads": None}
    assert LlamaConfig.from_dict(nulls, "config.json").num_key_value_heads == \
        transformers.LlamaConfig(**nulls).num_key_value_heads == 4


def test_every_field_a_config_gives_is_read_from_its_own_key():
    """Each field of a config.json that gives them all, each value unlike its default and unlike the others (BOS and
    EOS, the two bias flags), is read as transformers reads it."""
    import transformers

    from apt_min.llama import LlamaConfig

    raw = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 160,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "rms_norm_eps": 0.25, "rope_theta": 500.0, "max_position_embeddings": 300, "tie_word_embeddings": True,
           "bos_token_id": 5, "eos_token_id": 7}
    for biases in ({"attention_bias": True, "mlp_bias": False}, {"attention_bias": False, "mlp_bias": True}):
        ours = LlamaConfig.from_dict({**raw, **biases}, "config.json")
        theirs = transformers.LlamaConfig(**raw, **biases)
        assert_fields_read_as_transformers_reads_them(ours, theirs)
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 500.0


def test_a_config_naming_only_its_architecture_or_missing_a_size_field(folder):
    """A config.json that says LlamaForCausalLM in `architectures` with no model_type (some exports write only that)
    is a Llama; one without a field that sets the model's shape is refused naming the file and the field."""
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("model_type")
    raw["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(raw))
    assert Llama.from_pretrained(folder).config.hidden_size == raw["hidden_size"]
    raw.pop("intermediate_size")
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: missing fields \['intermediate_size'\]"):
        Llama.from_pretrained(folder)


def test_the_default_config_is_llama_2_7bs():
    """LlamaConfig() (what the tiny stand-in LLM leaves unset) is Llama-2-7B's config.json, read: its RMSNorm epsilon
    and rotary base included. (Vicuna-7B v1.1, the paper preset's, has that shape; its own config.json, with
    epsilon 1e-6 and 2 048 positions, is read when it loads.)"""
    from apt_min.llama import LlamaConfig

    llama2_7b = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                 "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "max_position_embeddings": 4096,
                 "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    assert LlamaConfig() == LlamaConfig.from_dict(llama2_7b, "config.json")


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


def test_key_stored_twice(folder):
    """A key in two shards (the index names only one): which copy wins would be an accident of file order."""
    key = "model.norm.weight"
    first, second = _shard_holding(folder, key), _shard_holding(folder, "model.embed_tokens.weight")
    assert first != second
    _edit_shard(folder, "model.embed_tokens.weight", lambda t: t.update({key: torch.ones(64)}))
    with pytest.raises(CheckpointError, match="stored twice") as e:
        Llama.from_pretrained(folder)
    files = re.search(r"'model\.norm\.weight' is stored twice \((\S+) and (\S+)\)", str(e.value))
    assert files and {files[1], files[2]} == {first.name, second.name}


def test_index_names_wrong_shard(folder):
    key = "model.norm.weight"
    other = _shard_holding(folder, "model.embed_tokens.weight").name
    assert other != _shard_holding(folder, key).name
    _edit_index(folder, lambda m: m.update({key: other}))
    with pytest.raises(CheckpointError, match=rf"index\.json: says '{re.escape(key)}' is in {re.escape(other)}, "
                                              "but that file does not hold it"):
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


def _safetensors(path, header: dict, data: bytes = bytes(64)):
    """A .safetensors file written by hand: the header as given (right or wrong), then the data."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, says", [
    ([1, 2], "header is not a JSON object"),
    ({"x": {"dtype": "F32", "shape": [2]}}, r"'x' has a malformed shape \[2\] or offsets None"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "malformed"),  # into the header's bytes
    ({"x": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, "malformed"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "'x' and 'y' overlap"),
    ({"x": "F32"}, "'x' has no dtype, shape and offsets"),
    ({"x": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}}, "'x' has unsupported dtype 'U32'"),  # not floats
], ids=["list", "no-offsets", "negative-offset", "negative-shape", "overlap", "not-an-object", "unsupported-dtype"])
def test_a_malformed_safetensors_header_is_refused_naming_the_file(tmp_path, header, says):
    """What the safetensors format forbids is a CheckpointError naming the file (never a tensor filled from the
    header's bytes or from another tensor's, and never a bare KeyError or TypeError)."""
    from apt_min.checkpoint import safetensors_entries

    with pytest.raises(CheckpointError, match=f"bad.safetensors: .*{says}"):
        safetensors_entries(_safetensors(tmp_path / "bad.safetensors", header))


def test_safetensors_bounds_are_exact(tmp_path):
    """A file whose last tensor ends at its last byte loads, one byte less is truncated; tensors that touch are
    fine, one byte shared is an overlap; a file of a header alone, or of empty tensors, is valid (the safetensors
    library writes both)."""
    from apt_min.checkpoint import safetensors_entries

    x = {"x": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}
    entries = safetensors_entries(_safetensors(tmp_path / "exact.safetensors", x, bytes(range(64))))
    got = torch.empty(16)
    entries["x"](got)
    assert torch.equal(got.view(torch.uint8), torch.arange(64, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="short.safetensors: tensor 'x' is truncated"):
        safetensors_entries(_safetensors(tmp_path / "short.safetensors", x, bytes(63)))
    two = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    safetensors_entries(_safetensors(tmp_path / "touch.safetensors",
                                     two | {"y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}))
    with pytest.raises(CheckpointError, match="'x' and 'y' overlap"):
        safetensors_entries(_safetensors(tmp_path / "shared.safetensors",
                                         two | {"y": {"dtype": "F32", "shape": [2], "data_offsets": [7, 15]}}))
    save_file({}, tmp_path / "none.safetensors")
    assert safetensors_entries(tmp_path / "none.safetensors") == {}
    save_file({"e": torch.zeros(0), "f": torch.zeros(2, 0)}, tmp_path / "empty.safetensors")
    entries = safetensors_entries(tmp_path / "empty.safetensors")
    assert {k: tuple(e.shape) for k, e in entries.items()} == {"e": (0,), "f": (2, 0)}
    entries["f"](torch.empty(2, 0))


def test_a_torch_checkpoint_of_other_things_or_the_old_format(tmp_path):
    """A .pth whose entries are not all tensors (training state beside the weights, no "model" entry) is refused by
    name; one in torch's pre-1.6 format, which cannot be memory-mapped, is read without the map."""
    from apt_min.checkpoint import torch_entries

    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "state.pth")
    with pytest.raises(CheckpointError, match=r"state.pth: expected a dict of tensors \(or one under 'model'\)"):
        torch_entries(tmp_path / "state.pth", "model")
    torch.save({"model": {"w": torch.arange(3.0)}}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    entries = torch_entries(tmp_path / "old.pth", "model")
    got = torch.empty(3)
    entries["w"](got)
    assert torch.equal(got, torch.arange(3.0))


def test_a_strided_destination_is_filled_and_a_broken_index_named(tmp_path):
    from apt_min.checkpoint import checkpoint_tensors, safetensors_entries

    want = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    save_file({"w": want}, tmp_path / "w.safetensors")
    for dtype in (torch.float32, torch.float64):  # read straight in, and cast piece by piece
        dest = torch.zeros(3, 2, dtype=dtype).t()  # (2, 3), not contiguous
        safetensors_entries(tmp_path / "w.safetensors")["w"](dest)
        assert torch.equal(dest, want.to(dtype))
    # a destination off the CPU (a GPU's; the meta device stands in here) of the file's own dtype is filled piece by
    # piece too: reading straight into its memory works only on the CPU
    safetensors_entries(tmp_path / "w.safetensors")["w"](torch.empty(2, 3, device="meta"))
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a JSON object"):
        checkpoint_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(b"\xff\xfe{\x00")  # not UTF-8 text (a UTF-16 file)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a JSON object"):
        checkpoint_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": 3}}))
    with pytest.raises(CheckpointError, match="no 'weight_map' of key -> file name"):
        checkpoint_tensors(tmp_path)


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
        again = Llama.from_pretrained(tmp_path / "out")
        theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out")
        assert torch.equal(again(ids), ours(ids))
        assert_close_rel(again.double()(ids), theirs.double()(ids).logits, 1e-5)
    theirs.save_pretrained(tmp_path / "theirs")  # the same keys as transformers stores (a tied lm_head left out)
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == \
        load_file(tmp_path / "theirs" / "model.safetensors").keys()
    # and the same header metadata as transformers writes ({"format": "pt"}: the framework the tensors are for)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "theirs" / "model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata() == {"format": "pt"}


def test_save_pretrained_writes_transformers_4_spelling_too(tmp_path):
    """config.json as save_pretrained writes it, cut to the fields transformers 4.x reads (rope_theta, rope_scaling,
    torch_dtype: no 5.x rope_parameters), still describes the model: a bfloat16 LLM with linear rope scaling reads
    back, in transformers (dtype="auto") and here, in bfloat16 with the scaling, giving the same logits."""
    from transformers import LlamaForCausalLM

    scaling = {"rope_type": "linear", "factor": 4.0}
    _, folder = hf_llama(tmp_path / "src", shards=False, rope_parameters={"rope_theta": 500.0, **scaling})
    ours = Llama.from_pretrained(folder, dtype="bf16")
    ours.save_pretrained(tmp_path / "out")
    file = tmp_path / "out" / "config.json"
    raw = json.loads(file.read_text())
    assert "dtype" not in raw
    del raw["rope_parameters"]
    file.write_text(json.dumps(raw))
    again = Llama.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert again.config.rope_scaling == scaling and again.config.rope_theta == 500.0
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 96, (2, 40))  # positions well past where the scaling shows
    with torch.no_grad():
        assert_close_rel(again.double()(ids), theirs.double()(ids).logits, 1e-5)

def test_the_llms_embedding_table_is_read_alone(saved, monkeypatch):
    """build.llm_embeddings (stage 0's --aligner_words=llm, --aligner_init=llm) reads the input embeddings from the
    sharded folder, as float32, without building the LLM (a 7 B model in float32 is 27 GB)."""
    from apt_min import build
    from apt_min.config import load_config

    hf, folder = saved
    monkeypatch.setattr(Llama, "from_pretrained", lambda *a, **k: pytest.fail("the whole LLM was loaded"))
    table = build.llm_embeddings(load_config("tiny", {"llm_path": str(folder)}))
    assert table.dtype == torch.float32
    assert torch.equal(table, hf.model.embed_tokens.weight.detach().float())


def test_loading_holds_no_second_copy_of_the_model(tmp_path):
    """from_pretrained reads each tensor straight into its parameter (a cast one through a 16 MiB buffer): loading a
    sharded 222 MiB checkpoint in a fresh process grows its peak memory by about the model's own size (measured
    1.00 in fp32, 1.21 into bf16, the buffer included; benchmarks/bench_load_memory.py prints the same for a
    512 MiB one beside transformers). A loader holding a second copy would show 2, one holding a whole float32
    tensor to cast would show about 1.8 into bf16 (its 62 MiB word table)."""
    from benchmarks.bench_load_memory import measure
    from benchmarks.common import save_random_hf_llama

    save_random_hf_llama(tmp_path, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376,
                         max_shard_size="100MB")
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    ratios = {dtype: (r := measure("ours", dtype, str(tmp_path)))["peak"] / r["size"] for dtype in ("fp32", "bf16")}
    assert ratios["fp32"] <= 1.2 and ratios["bf16"] <= 1.4, ratios


def test_an_llm_folder_without_input_embeddings_is_named(saved, tmp_path):
    """build.llm_embeddings names the folder whose weights hold no model.embed_tokens.weight (another model's)."""
    from apt_min import build
    from apt_min.config import load_config

    shutil.copy(saved[1] / "config.json", tmp_path)
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))}: its weights hold no "
                                              r"model\.embed_tokens\.weight"):
        build.llm_embeddings(load_config("tiny", {"llm_path": str(tmp_path)}))


@pytest.mark.parametrize("header, says", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, "malformed"),  # three offsets
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, "malformed"),  # not integers
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "malformed"),  # end before begin
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},  # 4 bytes more than 2 float32
     "truncated or its offsets do not match"),
], ids=["three-offsets", "float-offsets", "reversed-offsets", "longer-than-shape"])
def test_offsets_must_be_two_integers_spanning_exactly_the_shape(tmp_path, header, says):
    """The format's data_offsets are [begin, end) in bytes, integers, and end - begin is the shape's size exactly."""
    from apt_min.checkpoint import safetensors_entries

    with pytest.raises(CheckpointError, match=f"bad.safetensors: tensor 'x' .*{says}"):
        safetensors_entries(_safetensors(tmp_path / "bad.safetensors", header))


def test_a_bad_header_length_or_header_bytes_are_named(tmp_path):
    """The first 8 bytes give the header's length: 0, or more than the bytes after them, is a bad length (even when
    what follows would parse); header bytes that are not UTF-8 are not JSON."""
    from apt_min.checkpoint import safetensors_entries

    (tmp_path / "zero.safetensors").write_bytes(bytes(8) + b"{}")
    (tmp_path / "long.safetensors").write_bytes((2 + 8).to_bytes(8, "little") + b"{}")  # claims 8 bytes too many
    for name in ("zero.safetensors", "long.safetensors"):
        with pytest.raises(CheckpointError, match=f"{name}: not a safetensors file \\(bad header length\\)"):
            safetensors_entries(tmp_path / name)
    raw = b'{"\xff": 1}'
    (tmp_path / "latin.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match=r"latin.safetensors: not a safetensors file \(header is not JSON\)"):
        safetensors_entries(tmp_path / "latin.safetensors")


def test_tensors_listed_out_of_offset_order_do_not_overlap(tmp_path):
    """The header may list tensors in any order; overlap is judged on their byte ranges, not on the listing."""
    from apt_min.checkpoint import safetensors_entries

    header = {"y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
              "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    entries = safetensors_entries(_safetensors(tmp_path / "order.safetensors", header, data))
    got = torch.empty(2)
    entries["y"](got)
    assert got.tolist() == [3.0, 4.0]


def test_every_safetensors_dtype_is_read_as_stored(tmp_path):
    """Each of the format's integer and bool dtypes, and F64, written by the safetensors library, reads back bit for
    bit, into its own dtype and cast into float64 (200 as U8 is 200, not -56)."""
    from apt_min.checkpoint import safetensors_entries

    values = [0, 1, 100, 127]
    tensors = {"i64": torch.tensor(values + [-2 ** 40]), "i32": torch.tensor(values + [-70000], dtype=torch.int32),
               "i16": torch.tensor(values + [-300], dtype=torch.int16),
               "i8": torch.tensor(values + [-5], dtype=torch.int8),
               "u8": torch.tensor(values + [200], dtype=torch.uint8),
               "b": torch.tensor([True, False, True, True, False]),
               "f64": torch.tensor([0.1, 1, 100, 127, -2 ** 40], dtype=torch.float64)}  # F64 too
    save_file(tensors, tmp_path / "ints.safetensors")
    entries = safetensors_entries(tmp_path / "ints.safetensors")
    for key, want in tensors.items():
        got = torch.empty_like(want)
        entries[key](got)
        assert got.dtype == want.dtype and torch.equal(got, want), key
        wide = torch.empty(5, dtype=torch.float64)
        entries[key](wide)
        assert wide.tolist() == [float(v) for v in want.tolist()], key


def test_reading_allocates_no_full_size_temporary(tmp_path, monkeypatch):
    """A tensor of the destination's dtype goes straight from disk into it: no allocation at all. A cast goes through
    one buffer of at most READ_CHUNK elements, and never more than the tensor holds."""
    import apt_min.checkpoint
    from apt_min.checkpoint import safetensors_entries

    want = torch.arange(6, dtype=torch.float32)
    save_file({"w": want}, tmp_path / "w.safetensors")
    entry = safetensors_entries(tmp_path / "w.safetensors")["w"]
    same, wide = torch.empty(6), torch.empty(6, dtype=torch.float64)
    sizes, empty = [], torch.empty

    def recording(*shape, **kw):
        t = empty(*shape, **kw)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(apt_min.checkpoint.torch, "empty", recording)
    entry(same)
    assert sizes == [] and torch.equal(same, want)
    entry(wide)
    monkeypatch.undo()
    assert sum(sizes) <= 6 and torch.equal(wide, want.double())


def test_weight_files_must_be_files_and_an_index_an_object(tmp_path):
    """A folder named like a weight file or an index is not one: skipped when looking for weights, listed as not there
    when a shard; an index that is JSON but not an object is named."""
    from apt_min.checkpoint import checkpoint_tensors

    (tmp_path / "model.safetensors.index.json").mkdir()
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        checkpoint_tensors(tmp_path)
    shutil.rmtree(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"lists shard files that are not there: \['model.safetensors'\]"):
        checkpoint_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a JSON object"):
        checkpoint_tensors(tmp_path)


def test_resolve_dtype_refuses_a_torch_dtype_it_does_not_list():
    from apt_min.checkpoint import resolve_dtype

    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("auto") is torch.float32  # a config without torch_dtype: float32, as the docstring says
    assert resolve_dtype("auto", "bfloat16") is torch.bfloat16
    for dtype in (torch.float64, torch.int8):
        with pytest.raises(ValueError, match="unknown dtype"):
            resolve_dtype(dtype)


def test_a_torch_file_that_is_not_a_dict_and_an_unpickling_error_are_named(tmp_path):
    """A .pth holding a bare tensor is refused by name (not a RuntimeError from looking for "model" in a tensor); a
    refused global is reported with torch's reason, without its "WeightsUnpickler error:" prefix."""
    from apt_min.checkpoint import torch_entries

    torch.save(torch.ones(3), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"bare.pth: expected a dict of tensors \(or one under 'model'\)"):
        torch_entries(tmp_path / "bare.pth", "model")

    class Payload:
        def __reduce__(self):
            return (print, ("run",))

    torch.save({"w": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: cannot be read as a weights-only torch checkpoint "
                                              r"\(Unsupported global"):
        torch_entries(tmp_path / "evil.pth")


def test_key_problems_name_the_files_and_list_at_most_eight_keys(tmp_path):
    """check_keys' message: the folder, then every weight file by name, then the keys sorted, the first 8 of each
    kind listed and the count given when there are more."""
    from apt_min.checkpoint import _Entry, check_keys

    shards = {tmp_path / "b.safetensors": {"x": _Entry((2,), None)}, tmp_path / "a.safetensors": {}}
    expected = {f"k{i:02d}": (1,) for i in range(10)} | {"x": (2,)}
    with pytest.raises(CheckpointError) as e:
        check_keys(shards, expected, set(), (), tmp_path)
    listed = ", ".join(f"k{i:02d}" for i in range(8))
    assert str(e.value) == f"{tmp_path} (a.safetensors, b.safetensors): missing keys: {listed} ... (10 in all)"
    with pytest.raises(CheckpointError, match=r"missing keys: k00, k01$"):
        check_keys(shards, {"k00": (1,), "k01": (1,), "x": (2,)}, set(), (), tmp_path)
    eight = {f"k{i:02d}": (1,) for i in range(8)} | {"x": (2,)}  # exactly eight: all listed, no count
    with pytest.raises(CheckpointError, match=rf"missing keys: {listed}$"):
        check_keys(shards, eight, set(), (), tmp_path)
    # mis-shaped keys likewise: sorted, the first 8 shown (the same 8 in every process, whatever its hash seed)
    misshaped = {tmp_path / "a.safetensors": {f"w{i:02d}": _Entry((3,), None) for i in reversed(range(12))}}
    with pytest.raises(CheckpointError) as e:
        check_keys(misshaped, {f"w{i:02d}": (1,) for i in range(12)}, set(), (), tmp_path)
    assert str(e.value).endswith("wrong shapes: " + ", ".join(f"w{i:02d} in a.safetensors: expected (1,), found (3,)"
                                                              for i in range(8)) + " ... (12 in all)")
