"""The tokenizer against transformers' LlamaTokenizer, on a sentencepiece model trained here."""

import json
import re

import pytest
import torch

from apt_min.checkpoint import CheckpointError
from apt_min.tokenizer import Tokenizer, pad_ids, train_sentencepiece

CORPUS = ["A dog barks twice while a car passes by.", "Summarize the audio with key words.",
          "When does the siren happen?", "Between 1.25s and 3.50s a bell rings; then a 440 Hz tone.",
          "This is a sound of rain.", "How many times does the alarm occur? Three."] * 40
SAMPLES = ["A dog barks twice.", "This is a sound of", "When does siren happen? 0.50s-2.25s",
           "digits 12345, unicode ünïcödé and ✓ (byte fallback)", "line\nbreak", "trailing spaces  ", "",
           "no normalisation: the ligature ﬁ, x², ｆｕｌｌ width"]  # (NFKC would write fi, x2, full)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "made"  # a folder not there yet: train_sentencepiece makes it
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


def test_the_vocabulary_asked_is_met_where_the_corpus_allows_and_is_a_ceiling_where_not(tmp_path):
    """train_sentencepiece makes the vocabulary size asked; a corpus too small for it (a miniature run's few
    sentences) gives a smaller vocabulary, not an error, and a tokenizer that still spells everything."""
    assert Tokenizer(train_sentencepiece(CORPUS, tmp_path / "a" / "tokenizer.model", vocab_size=300)).vocab_size == 300
    tok = Tokenizer(train_sentencepiece(CORPUS[:2], tmp_path / "b" / "tokenizer.model", vocab_size=400))
    assert tok.vocab_size < 400 and all(tok.decode(tok.encode(text)) == text for text in SAMPLES)

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
    assert tok.decode([tok.eos_id] + tok.encode("rain", bos=False)) == ""  # an answer that ends at once is empty
    assert tok.decode(torch.tensor([tok.pad_id] * 3 + tok.encode("rain", bos=False))) == "rain"
    # ids beyond the vocabulary (rows an LLM added to its table, InstructBLIP's [PAD] and <image>) are left out
    assert tok.decode(tok.encode("rain", bos=False) + [tok.vocab_size, tok.vocab_size + 1]) == "rain"
    # and so are negative ones (generate pads with -1 where it is asked to stop at -1 alone), which sentencepiece and
    # tokenizers would refuse
    assert tok.decode([-1] + tok.encode("rain", bos=False) + [-1]) == "rain"


def test_pad_left_and_right(folder):
    tok = Tokenizer(folder)
    a, b = tok.encode("A dog barks twice."), tok.encode("rain")
    ids, mask = tok.pad([a, b], side="left")
    assert ids.shape == mask.shape == (2, len(a))
    assert ids[1, -len(b):].tolist() == b and not mask[1, :len(a) - len(b)].any() and mask[1, -len(b):].all()
    ids, mask = tok.pad([a, b], side="right")
    assert ids[1, :len(b)].tolist() == b and (ids[1, len(b):] == tok.pad_id).all() and mask.sum() == len(a) + len(b)


def test_pad_ids_pads_with_the_id_given_and_knows_its_sides():
    """pad_ids fills with the pad id it is given (not 0, <unk> in Llama's tokenizers), on either side; any other side is
    refused by name."""
    ids, mask = pad_ids([[5, 6, 7], [8]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[True] * 3, [True, False, False]]
    ids, mask = pad_ids([[5, 6, 7], [8]], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    with pytest.raises(ValueError, match="side must be 'left' or 'right', not 'middle'"):
        pad_ids([[5], [6, 7]], pad_id=9, side="middle")


@pytest.mark.parametrize("ids, pad", [(dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3), 0),
                                     (dict(pad_id=-1, unk_id=2, bos_id=0, eos_id=1), 2)], ids=["pad at 0", "unk at 2"])
def test_a_sentencepiece_model_pads_with_its_pad_piece_or_else_its_unk(tmp_path, ids, pad):
    """A sentencepiece model with a pad piece pads with it, at id 0 too (where Llama's models, which have none, keep
    <unk>); one without pads with its <unk>, wherever it stands."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=300, model_type="bpe",
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2, **ids)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok = Tokenizer(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (pad, ids["bos_id"], ids["eos_id"], ids["unk_id"])
    assert tok.pad([[5, 6], [7]])[0].tolist() == [[5, 6], [7, pad]]  # and pad fills with it


def test_special_tokens_of_a_tokenizer_json_folder(folder, tmp_path):
    """Where only tokenizer.json is read: without tokenizer_config.json BOS and EOS are Llama's <s> and </s>; a
    pad_token the config names is the padding, before <unk> (Llama fine-tunes often pad with </s>); an EOS it names
    that tokenizers does not hold special (an ordinary piece) still ends the text and is left out of it; a BOS or EOS
    the vocabulary lacks is refused by name; and the config is read next to a tokenizer.json given as a file."""
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.unlink()
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    config.write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    assert (Tokenizer(tmp_path).pad_id, Tokenizer(tmp_path / "tokenizer.json").pad_id) == (2, 2)
    comma = tok.encode(",", bos=False)[-1]
    config.write_text(json.dumps({"eos_token": tok.hf.id_to_token(comma), "unk_token": "<unk>"}))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id == comma and tok.decode(tok.encode("rain, then a bell", bos=False)) == "rain"
    config.write_text(json.dumps({"bos_token": "<nope>", "eos_token": "</s>"}))
    with pytest.raises(CheckpointError, match="BOS '<nope>' or EOS '</s>' is not in the vocabulary"):
        Tokenizer(tmp_path)
    config.write_text(json.dumps({"bos_token": "<s>", "eos_token": "<nope>"}))
    with pytest.raises(CheckpointError, match="BOS '<s>' or EOS '<nope>' is not in the vocabulary"):
        Tokenizer(tmp_path)


def test_a_tokenizer_json_naming_no_pad_or_unk_pads_with_eos_not_a_piece_of_text(tmp_path):
    """A tokenizer.json whose config names neither a pad nor an unk token (here a word-level vocabulary whose id 0 is
    an ordinary word) pads with EOS, never with a piece of text: decoding keeps every word before EOS, id 0's too."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    hf = HFTokenizer(WordLevel({"rain": 0, "<s>": 1, "</s>": 2, "bell": 3}, unk_token="bell"))
    hf.pre_tokenizer = Whitespace()
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("rain bell rain", eos=True) == [1, 0, 3, 0, 2]
    assert tok.decode(tok.encode("rain bell rain", eos=True) + [3]) == "rain bell rain"


def test_tokens_a_tokenizer_json_adds(folder, tmp_path):
    """tokenizer.json may add tokens after the model's pieces (InstructBLIP's Vicuna adds [PAD] and <image>, chat
    models their turn markers): they count in vocab_size, and decode gives transformers' decode(skip_special_tokens=
    True): an ordinary added token as written, a special one left out."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer, LlamaTokenizer

    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.add_tokens(["<image>"])
    hf.add_special_tokens(["<|turn|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == len(ref) == Tokenizer(folder).vocab_size + 2
    ids = tok.encode("rain", bos=False) + [hf.token_to_id("<image>"), hf.token_to_id("<|turn|>")] + tok.encode(
        " bell", bos=False)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "rain<image> bell"


def test_a_folder_with_both_files_is_read_through_tokenizer_model(folder, tmp_path):
    """A model folder holding tokenizer.model and tokenizer.json (as Vicuna's do) is read through sentencepiece."""
    (tmp_path / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer.json").write_text("{}")  # unreadable: reading it would fail
    tok = Tokenizer(tmp_path)
    assert tok.file.name == "tokenizer.model" and tok.encode("rain") == Tokenizer(folder).encode("rain")
    (tmp_path / "tokenizer.model").rename(tmp_path / "llama.model")  # a model file given by path, under any name
    assert Tokenizer(tmp_path / "llama.model").encode("rain") == Tokenizer(folder).encode("rain")


def test_bad_files(tmp_path):
    """A folder without a tokenizer, and a tokenizer.model or tokenizer.json that cannot be read, are refused, naming
    the folder or the file."""
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no tokenizer.model or tokenizer.json")):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer.model'}: not a sentencepiece model")):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: not a tokenizers JSON file")):
        Tokenizer(tmp_path)
