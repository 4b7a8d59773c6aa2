"""The tokenizer against transformers' LlamaTokenizer, on a sentencepiece model trained here."""

import json

import pytest
import torch

from apt_min.tokenizer import Tokenizer, train_sentencepiece

CORPUS = ["A dog barks twice while a car passes by.", "Summarize the audio with key words.",
          "When does the siren happen?", "Between 1.25s and 3.50s a bell rings; then a 440 Hz tone.",
          "This is a sound of rain.", "How many times does the alarm occur? Three."] * 40
SAMPLES = ["A dog barks twice.", "This is a sound of", "When does siren happen? 0.50s-2.25s",
           "digits 12345, unicode ünïcödé and ✓ (byte fallback)", "line\nbreak", "trailing spaces  ", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_sentencepiece(CORPUS, folder / "tokenizer.model", vocab_size=400)
    return folder


def test_ids_match_transformers(folder):
    from transformers import LlamaTokenizer

    ref = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    tok = Tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id) == (1, 2, 0)
    for text in SAMPLES:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True) == text


def test_digits_are_pieces_of_their_own(folder):
    """Llama's convention: a number is spelled digit by digit (so "440" and "1.25s" tokenize alike wherever they
    stand), and an unseen character falls back to its bytes rather than to <unk>."""
    tok = Tokenizer(folder)
    for text in ("440", "1.25s", "between 10.5s and 12s"):
        pieces = [tok.decode([i]) for i in tok.encode(text, bos=False)]
        assert all(len(p.strip()) == 1 for p in pieces if any(c.isdigit() for c in p)), (text, pieces)
    assert tok.pad_id not in tok.encode("✓ ♫ 東京", bos=False)  # 0 is <unk>: never produced


def test_tokenizer_json_gives_the_same_ids(folder, tmp_path):
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "tokenizer.model").exists()
    sp, js = Tokenizer(folder), Tokenizer(tmp_path)
    assert (js.bos_id, js.eos_id, js.pad_id, js.vocab_size) == (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size)
    for text in SAMPLES:
        assert js.encode(text, eos=True) == sp.encode(text, eos=True)
        assert js.decode(js.encode(text, eos=True)) == text
    # Llama-2's own tokenizer.json adds BOS in its post-processor; encode adds it itself, so once
    file = tmp_path / "tokenizer.json"
    spec = json.loads(file.read_text())
    bos, first, second = ({"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"Sequence": {"id": "B", "type_id": 1}})
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, first], "pair": [bos, first, second],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    file.write_text(json.dumps(spec))
    assert [Tokenizer(tmp_path).encode(text, bos=b) for text in SAMPLES for b in (True, False)] == [
        sp.encode(text, bos=b) for text in SAMPLES for b in (True, False)]


def test_special_tokens_written_as_objects(folder, tmp_path):
    """tokenizer_config.json as older transformers wrote it (Vicuna v1.1's): each special token an AddedToken object;
    its content is the token."""
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        k: {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False} for k, t in (("bos_token", "</s>"), ("eos_token", "<s>"), ("unk_token", "<unk>"))}))
    tok = Tokenizer(tmp_path)  # BOS and EOS swapped on purpose: they must come from the file, not from defaults
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


def test_decode_stops_at_eos_and_drops_padding(folder):
    tok = Tokenizer(folder)
    ids = tok.encode("A dog barks.", eos=True) + tok.encode("junk after eos", bos=False)
    assert tok.decode(ids) == "A dog barks."
    assert tok.decode(torch.tensor([tok.pad_id] * 3 + tok.encode("rain", bos=False))) == "rain"
    # ids beyond the vocabulary (rows an LLM added to its table, InstructBLIP's [PAD] and <image>) are left out
    assert tok.decode(tok.encode("rain", bos=False) + [tok.vocab_size, tok.vocab_size + 1]) == "rain"


def test_pad_left_and_right(folder):
    tok = Tokenizer(folder)
    a, b = tok.encode("A dog barks twice."), tok.encode("rain")
    ids, mask = tok.pad([a, b], side="left")
    assert ids.shape == mask.shape == (2, len(a))
    assert ids[1, -len(b):].tolist() == b and not mask[1, :len(a) - len(b)].any() and mask[1, -len(b):].all()
    ids, mask = tok.pad([a, b], side="right")
    assert ids[1, :len(b)].tolist() == b and (ids[1, len(b):] == tok.pad_id).all() and mask.sum() == len(a) + len(b)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer(tmp_path)
