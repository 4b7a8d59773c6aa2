"""APT-BLIP-2: InstructBLIP loaded from a Hugging Face folder against transformers' own model, image processing
against its processor, the three modes' sequences, and the refusal of an APT trained against another LLM."""

import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from apt_min.aligner import Aligner, AlignerConfig
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.blip2 import APTBLIP2, MODES, InstructBLIP, avqa_prompt, named_option
from apt_min.checkpoint import CheckpointError
from apt_min.llama import Llama
from apt_min.model import APT, fingerprint, model_files, weight_probe
from apt_min.tokenizer import train_sentencepiece
from tests.helpers import assert_close_rel

Q = 4  # visual queries per frame
WORDS = ["what", "is", "making", "the", "sound", "dog", "car", "bell", "cat", "choose", "correct", "option", "to",
         "following", "question", "options", "answer", "which", "animal", "barks", "loud", "red", "blue"]
CORPUS = ["Choose the correct option to the following question: What is making the sound? Options: 0 dog; 1 car; "
          "2 bell; 3 cat. Answer:", "Which animal barks? A dog barks.", "The red car is loud."] * 60


def randomize(model):
    """Beyond transformers' small init, so that every path visibly matters (as tests/helpers.hf_llama does)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 2.5 / p.shape[-1] ** 0.5) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random InstructBLIP saved the way the real one is: save_pretrained (several safetensors shards + index),
    the LLM's tokenizer at the top, the Q-Former's BERT tokenizer in qformer_tokenizer/, preprocessor_config.json."""
    from transformers import (
        BertTokenizerFast,
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    folder = tmp_path_factory.mktemp("instructblip")
    train_sentencepiece(CORPUS, folder / "tokenizer.model", vocab_size=320)
    (folder / "tokenizer_config.json").write_text(json.dumps({  # as the real one: "</s>" is InstructBLIP's BOS
        "tokenizer_class": "LlamaTokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
        "add_bos_token": True}))
    vocab = folder / "bert-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
                                *"0123456789", *"?:;.,"]) + "\n")
    bert = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    bert.save_pretrained(folder / "qformer_tokenizer")
    BlipImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(folder)
    torch.manual_seed(0)
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14, layer_norm_eps=1e-6),
        qformer_config=dict(vocab_size=len(bert) + 1, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=128),
        text_config=dict(model_type="llama", vocab_size=352, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         rms_norm_eps=1e-5, max_position_embeddings=512),
        num_query_tokens=Q, image_token_index=351)
    model = InstructBlipForConditionalGeneration(config).eval()
    randomize(model)
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder, model, bert


@pytest.fixture(scope="module")
def blip(hf_folder):
    return InstructBLIP.from_pretrained(hf_folder[0])


def frames(n=2, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)) for _ in range(n)]


def linked_copy(folder, to, copied=("model.safetensors.index.json", "config.json")):
    """`folder` as links in `to`, except the files named in `copied`, which are copies (a test may rewrite them)."""
    to.mkdir()
    for f in folder.iterdir():
        if f.name in copied:
            shutil.copy(f, to / f.name)
        else:
            (to / f.name).symlink_to(f)
    return to


def test_loads_strictly_with_shards(hf_folder, tmp_path):
    folder = hf_folder[0]
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(folder.glob("model-*.safetensors"))) > 2  # really sharded
    # a stored key no part reads is refused, naming it (one that holds a known name further in, too: a name is
    # matched from its start); the position ids older transformers stored are left out; of many, eight are named
    nine = [f"vision_model.extra{i}.weight" for i in range(9)]
    for extras, refused in ((["vision_model.extra.weight"], re.escape("['vision_model.extra.weight']")),
                            (["old.query_tokens"], re.escape("['old.query_tokens']")),
                            (["qformer.embeddings.position_ids"], None),
                            (nine, r"\[('vision_model\.extra\d\.weight'(, )?){8}\] \.\.\. \(9 in all\)$")):
        copy = linked_copy(folder, tmp_path / f"with-{extras[0]}")
        save_file({extra: torch.zeros(3) for extra in extras}, copy / "model-extra.safetensors")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"].update({extra: "model-extra.safetensors" for extra in extras})
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
        if refused:
            with pytest.raises(CheckpointError, match=f"keys no part of InstructBLIP reads: {refused}"):
                InstructBLIP.from_pretrained(copy)
        else:
            InstructBLIP.from_pretrained(copy)


def test_fields_a_config_leaves_out_take_transformers_defaults(hf_folder, tmp_path):
    """transformers writes into config.json only what differs from its defaults (InstructBLIP-Vicuna's own config
    names few fields): a field left out reads as transformers' default for it. And a config of another architecture
    (other activations, biases, position embeddings, an encoder-decoder LLM) is refused, naming what differs."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    folder = hf_folder[0]
    copy = linked_copy(folder, tmp_path / "sparse")
    raw = json.loads((folder / "config.json").read_text())
    left_out = {"vision_config": ["layer_norm_eps", "hidden_act", "qkv_bias"],
                "qformer_config": ["layer_norm_eps", "hidden_act", "position_embedding_type"],
                "text_config": ["rms_norm_eps", "max_position_embeddings"]}
    sparse = raw | {part: {k: v for k, v in raw[part].items() if k not in keys} for part, keys in left_out.items()}
    del sparse["use_decoder_only_language_model"]  # left out as transformers' default (True): decoder-only
    (copy / "config.json").write_text(json.dumps(sparse))
    model = InstructBLIP.from_pretrained(copy)
    vision, qformer, text = InstructBlipVisionConfig(), InstructBlipQFormerConfig(), LlamaConfig()
    assert model.vision.config.norm_eps == vision.layer_norm_eps
    assert model.qformer.config.layer_norm_eps == qformer.layer_norm_eps
    assert (model.llm.config.rms_norm_eps, model.llm.config.max_position_embeddings) == \
        (text.rms_norm_eps, text.max_position_embeddings)
    (copy / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "num_query_tokens"}))
    queries = InstructBlipConfig().num_query_tokens
    with pytest.raises(CheckpointError, match=rf"qformer.query_tokens in .*: expected \(1, {queries}, 32\)"):
        InstructBLIP.from_pretrained(copy)  # the fixture has 4 queries; left out, 32 are expected
    for part, field, value in (("vision_config", "hidden_act", "relu"), ("vision_config", "qkv_bias", False),
                               ("qformer_config", "hidden_act", "relu"),
                               ("qformer_config", "position_embedding_type", "relative_key")):
        (copy / "config.json").write_text(json.dumps(raw | {part: raw[part] | {field: value}}))
        with pytest.raises(CheckpointError, match=rf"not an InstructBLIP this code reads \({part}.{field}={value!r}\)"):
            InstructBLIP.from_pretrained(copy)
    (copy / "config.json").write_text(json.dumps(raw | {"use_decoder_only_language_model": False}))
    with pytest.raises(CheckpointError, match="an encoder-decoder language model"):
        InstructBLIP.from_pretrained(copy)
    # the Q-Former's layout is read from the config: cross-attention in every layer expects layer 1's, which these
    # weights (every second layer, transformers' default) lack; and a BLIP-2 folder is no InstructBLIP
    (copy / "config.json").write_text(json.dumps(raw | {"qformer_config": raw["qformer_config"]
                                                        | {"cross_attention_frequency": 1}}))
    with pytest.raises(CheckpointError, match=r"missing keys: qformer\.layers\.1\.cross_attn\."):
        InstructBLIP.from_pretrained(copy)
    (copy / "config.json").write_text(json.dumps(raw | {"model_type": "blip-2"}))
    with pytest.raises(CheckpointError, match="model_type='blip-2', not 'instructblip'"):
        InstructBLIP.from_pretrained(copy)
    # norm eps written (none of them the defaults): the ViT's blocks and the norm over its output (post_layernorm,
    # the aligner's input norm) take the vision config's, the Q-Former's own norms the Q-Former config's
    eps = {"vision_config": raw["vision_config"] | {"layer_norm_eps": 1e-5},
           "qformer_config": raw["qformer_config"] | {"layer_norm_eps": 1e-7}}
    (copy / "config.json").write_text(json.dumps(raw | eps))
    model = InstructBLIP.from_pretrained(copy)
    assert model.vision.blocks[0].norm1.eps == model.qformer.ln_audio.eps == 1e-5
    assert model.qformer.embed_norm.eps == 1e-7


def test_image_processing_matches_transformers(hf_folder, blip):
    from transformers import BlipImageProcessorPil

    ref = BlipImageProcessorPil.from_pretrained(hf_folder[0])
    for image in frames(3):
        ours = blip.processing(image)
        theirs = torch.as_tensor(np.asarray(ref(image, return_tensors="np").pixel_values[0]))
        assert ours.shape == (3, 28, 28)
        assert_close_rel(ours, theirs, 1e-6)


def test_image_processing_reads_the_folders_settings(tmp_path):
    """Size, resampling filter, rescale factor, mean and std all come from preprocessor_config.json (here none of
    them BLIP's defaults); a `shortest_edge` size is read as the square's side; an image that cannot be read is an
    error naming its file."""
    from transformers import BlipImageProcessorPil

    from apt_min.vision import ImageError, ImageProcessing

    BlipImageProcessorPil(size={"height": 20, "width": 20}, resample=2, rescale_factor=1 / 200,
                          image_mean=[0.3, 0.5, 0.7], image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path)
    ours, ref = ImageProcessing.read(tmp_path), BlipImageProcessorPil.from_pretrained(tmp_path)
    for image in frames(3):
        theirs = torch.as_tensor(np.asarray(ref(image, return_tensors="np").pixel_values[0]))
        assert_close_rel(ours(image), theirs, 1e-6)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 24}}))
    assert ImageProcessing.read(tmp_path).size == 24
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 26}}))  # a height alone
    assert ImageProcessing.read(tmp_path).size == 26
    both = {"size": {"height": 28, "width": 28, "shortest_edge": 30}}  # the square BLIP resizes to, not the edge
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(both))
    assert ImageProcessing.read(tmp_path).size == 28
    (tmp_path / "notes.jpg").write_text("not a picture")
    for bad, why in ((tmp_path / "missing.jpg", "No such file"), (tmp_path / "notes.jpg", "cannot identify image")):
        with pytest.raises(ImageError, match=re.escape(f"{bad}: cannot be read as an image (") + f".*{why}"):
            ours(bad)  # and why: the file is missing, or it is no image Pillow knows
    from apt_min.errors import UserError

    assert issubclass(ImageError, UserError)  # a user's file: one clean line from evaluate.py and ask, no traceback


def test_the_defaults_are_instructblip_vicunas(tmp_path):
    """ViTConfig's defaults are transformers' InstructBLIP vision defaults (EVA ViT-g/14 less its last block: 1 + 256
    tokens); ImageProcessing's are BLIP's (CLIP's mean and std, 1/255, bicubic) at InstructBLIP's 224 px, and a
    folder without a preprocessor_config.json reads as them. The defaults a config.json may leave out are
    transformers' own: its InstructBLIP vision and Q-Former configs' and its LlamaConfig's."""
    from dataclasses import asdict

    from transformers import BlipImageProcessorPil, InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig

    from apt_min.blip2 import QFORMER_DEFAULTS, TEXT_DEFAULTS, VISION_DEFAULTS
    from apt_min.vision import ImageProcessing, ViTConfig

    for ours, theirs in ((VISION_DEFAULTS, InstructBlipVisionConfig()), (QFORMER_DEFAULTS, InstructBlipQFormerConfig()),
                         (TEXT_DEFAULTS, LlamaConfig())):
        known = {k: v for k, v in ours.items() if hasattr(theirs, k)}
        assert known == {k: getattr(theirs, k) for k in known}
        assert set(ours) - set(known) <= {"position_embedding_type"}  # a field transformers 5 no longer has

    ref, vit = InstructBlipVisionConfig(), ViTConfig()
    assert asdict(vit) == {"image_size": ref.image_size, "patch_size": ref.patch_size, "channels": 3,
                           "dim": ref.hidden_size, "depth": ref.num_hidden_layers, "heads": ref.num_attention_heads,
                           "hidden": ref.intermediate_size, "norm_eps": ref.layer_norm_eps}
    assert vit.num_patches == 256
    blip = BlipImageProcessorPil()
    assert ImageProcessing() == ImageProcessing(size=ref.image_size, mean=tuple(blip.image_mean),
                                                std=tuple(blip.image_std), rescale=blip.rescale_factor,
                                                resample=blip.resample)
    assert ImageProcessing.read(tmp_path) == ImageProcessing()


def test_the_image_encoder_matches_transformers():
    """The image encoder alone against transformers' InstructBLIP ViT (its last block's tokens, before the norm
    that our split gives the aligner), at settings of its own: 42 px (3 x 3 patches), norm eps 1e-3, in float64
    and fed float32 pixels. It is frozen from construction, and refuses images of another shape, naming it."""
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    from apt_min.blip2 import rename
    from apt_min.vision import ImageEncoder, ViTConfig

    torch.manual_seed(0)
    hf = InstructBlipVisionModel(InstructBlipVisionConfig(
        hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=42,
        patch_size=14, layer_norm_eps=1e-3)).eval()
    randomize(hf)
    ours = ImageEncoder(ViTConfig(image_size=42, patch_size=14, dim=32, depth=2, heads=4, hidden=80, norm_eps=1e-3))
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    state = {rename(f"vision_model.{k}"): v for k, v in hf.state_dict().items() if not k.startswith("post_layernorm")}
    ours.load_state_dict({k.removeprefix("vision."): v for k, v in state.items()})
    ours, hf = ours.double(), hf.double()
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        ref = hf(pixel_values=pixels.double(), output_hidden_states=True).hidden_states[-1]
        got = ours(pixels)
    assert got.shape == ref.shape == (2, 1 + 9, 32)
    assert_close_rel(got, ref, 1e-10)
    with pytest.raises(ValueError, match=re.escape("expected images of shape (B, 3, 42, 42), got (2, 1, 42, 42)")):
        ours(pixels[:, :1])
    with pytest.raises(ValueError, match=re.escape("expected images of shape (B, 3, 42, 42), got (2, 3, 28, 28)")):
        ours(pixels[..., :28, :28])  # whole patches still, but not the positions the encoder has
    with pytest.raises(ValueError, match="image_size=40 is not a multiple of patch_size=14"):
        ImageEncoder(ViTConfig(image_size=40, patch_size=14, dim=32, depth=1, heads=4, hidden=80))
    # CLS and the position table are drawn as EVA's ViT draws them, with std 0.02
    torch.manual_seed(0)
    wide = ImageEncoder(ViTConfig(image_size=28, patch_size=14, dim=4096, depth=0, heads=1, hidden=1))
    for drawn in (wide.cls_token, wide.pos_embed):
        assert abs(drawn.mean().item()) < 2e-3 and abs(drawn.std().item() - 0.02) < 2e-3


def test_image_processing_of_files_and_of_other_modes(hf_folder, tmp_path):
    """A frame given as a file reads as the same frame given as an image; grey and RGBA images become RGB as
    transformers' processor makes them; a size written as a number is the square's side and one not written is
    InstructBLIP's 224; a path Python cannot open (a NUL in it) is an error naming it, as a missing file is."""
    from transformers import BlipImageProcessorPil

    from apt_min.vision import ImageError, ImageProcessing

    ours, ref = ImageProcessing.read(hf_folder[0]), BlipImageProcessorPil.from_pretrained(hf_folder[0])
    image = frames(1)[0]
    for mode in ("L", "RGBA", "P"):
        other = image.convert(mode)
        other.save(tmp_path / f"frame-{mode}.png")
        theirs = torch.as_tensor(np.asarray(ref(other, return_tensors="np").pixel_values[0]))
        assert_close_rel(ours(other), theirs, 1e-6)
        assert_close_rel(ours(tmp_path / f"frame-{mode}.png"), theirs, 1e-6)
        assert_close_rel(ours(str(tmp_path / f"frame-{mode}.png")), theirs, 1e-6)
    for written, size in (({"size": 20}, 20), ({"image_mean": [0.5, 0.5, 0.5]}, 224)):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(written))
        assert ImageProcessing.read(tmp_path).size == size
    left = BlipImageProcessorPil.from_pretrained(tmp_path)  # what the file leaves out: BLIP's, the size InstructBLIP's
    assert ImageProcessing.read(tmp_path) == ImageProcessing(size=224, mean=(0.5, 0.5, 0.5), std=tuple(left.image_std),
                                                             rescale=left.rescale_factor, resample=left.resample)
    for height, width in ((20, 30), (30, 20)):  # another shape than the encoder's square: refused, not squashed
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": height, "width": width}}))
        with pytest.raises(CheckpointError, match=rf"preprocessor_config.json: an image size of {height} x {width} "
                                                  r"\(height x width\); the vision encoder reads square images"):
            ImageProcessing.read(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"width": 30}}))  # a width alone
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: an image size of width 30 and no height; "):
        ImageProcessing.read(tmp_path)
    bad = f"{tmp_path}/frame\x00.png"
    with pytest.raises(ImageError, match=re.escape(f"{bad}: cannot be read as an image")):
        ours(bad)


def test_qformer_tokenizer_from_a_vocabulary_file(hf_folder, tmp_path):
    """A qformer_tokenizer/ with only BERT's vocab.txt (older checkpoints): lower-cased unless its tokenizer_config
    says do_lower_case false, as transformers' BertTokenizer reads it."""
    from transformers import BertTokenizer

    from apt_min.blip2 import QFormerTokenizer

    vocab = hf_folder[0] / "bert-vocab.txt"
    shutil.copy(vocab, tmp_path / "vocab.txt")
    text = "What is making the Sound? Choose: 0 dog"
    for lower, config in ((True, None), (True, {"model_max_length": 512}), (False, {"do_lower_case": False})):
        if config is not None:  # a config that does not say keeps BERT's default: lower-cased
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        ids, mask = QFormerTokenizer(tmp_path)([text])
        assert ids[0][mask[0]].tolist() == BertTokenizer(str(vocab), do_lower_case=lower)(text).input_ids
    words = vocab.read_text().split("\n")  # [PAD] elsewhere than at 0: a batch is padded with its own id
    (tmp_path / "vocab.txt").write_text("\n".join([words[1], words[0], *words[2:]]))
    texts = [text, "dog"]
    ids, mask = QFormerTokenizer(tmp_path)(texts)
    bert = BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=False)
    assert ids.tolist() == bert(texts, padding=True).input_ids and bert.pad_token_id == 1


def test_a_folder_lacking_what_instructblip_reads_is_named(tmp_path):
    """An InstructBLIP folder without config.json, a Q-Former tokenizer folder with neither tokenizer.json nor
    vocab.txt, and a vision folder without vision.json are each named, with what is missing (and for the vision side,
    how to make one)."""
    from apt_min.blip2 import QFormerTokenizer

    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))}: not a model folder \(config\.json"):
        InstructBLIP.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))}: no Q-Former tokenizer \(tokenizer\.json "
                                              r"or vocab\.txt\)"):
        QFormerTokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))}: no trained vision side \(vision\.json\); "
                                              r"run `python train.py --stage vision`"):
        InstructBLIP.load_vision(tmp_path, None, None, {})


def test_qformer_tokenizer_matches_transformers(hf_folder, blip):
    bert = hf_folder[2]
    for text in ["What is making the sound?", "Choose the correct option: 0 dog; 1 car.", "UPPER case, digits 42"]:
        ids, mask = blip.qformer_tokenizer([text])
        assert ids[0][mask[0]].tolist() == bert(text).input_ids


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_frames_and_logits_match_transformers(hf_folder, dtype, rel):
    folder, hf, bert = hf_folder
    blip = InstructBLIP.from_pretrained(folder).to(dtype)
    hf = hf.to(dtype)
    prompt = "What is making the sound?"
    pixels = torch.stack([blip.processing(f) for f in frames(2)]).to(dtype)
    qids = bert([prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        ref = hf.get_image_features(pixels, qformer_input_ids=qids.input_ids,
                                    qformer_attention_mask=qids.attention_mask).pooler_output  # (2, Q, D)
        ours = blip.frame_prompts(pixels, prompt)
    assert ours.shape == (2 * Q, 48)
    assert_close_rel(ours, ref.reshape(2 * Q, 48), rel)
    two = [prompt, "Is it a dog?"]  # each frame its own instruction, of different lengths: the shorter one padded
    qids = bert(two, return_tensors="pt", padding=True)
    assert not qids.attention_mask.all()
    with torch.no_grad():
        ref = hf.get_image_features(pixels, qformer_input_ids=qids.input_ids,
                                    qformer_attention_mask=qids.attention_mask).pooler_output
        assert_close_rel(blip.visual_prompts(pixels, two), ref, rel)

    # the whole model on one frame, video only: [Q visual queries][BOS prompt] -> logits at every position
    apt = tiny_apt(blip)
    model = APTBLIP2(blip, apt.to(dtype))
    x, mask, _ = apt.embed_batch([model.segments(prompt, "video", blip.frame_prompts(pixels[:1], prompt))], {})
    from transformers import LlamaTokenizer

    text = LlamaTokenizer.from_pretrained(str(folder))(prompt).input_ids  # as InstructBLIP's processor writes it
    assert text[0] == 2  # its BOS: "</s>"
    input_ids = torch.tensor([[351] * Q + text])
    with torch.no_grad():
        ref = hf(pixel_values=pixels[:1], qformer_input_ids=qids.input_ids[:1],
                 qformer_attention_mask=qids.attention_mask[:1], input_ids=input_ids).logits
        ours = blip.llm(inputs_embeds=x, attention_mask=mask)
    assert ours.shape == ref.shape == (1, Q + len(text), 352)
    assert_close_rel(ours, ref, rel)


def test_loads_in_the_dtype_asked_or_the_one_its_config_names(hf_folder, blip, tmp_path):
    """Every part (the image encoder, the Q-Former and its projection, the LLM) is loaded in the dtype asked, and the
    frames' prompts come out in it, their image tokens close to float32's (the randomised Q-Former magnifies bfloat16's
    rounding many times). With dtype "auto", config.json's own torch_dtype (or `dtype`, transformers 5's name for it)
    is read before its LLM's, and float32 where none is written."""
    folder = hf_folder[0]
    half = InstructBLIP.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    pixels = torch.stack([blip.processing(f) for f in frames(2)])
    assert half.frame_prompts(pixels, "What is making the sound?").dtype == torch.bfloat16
    assert_close_rel(half.frame_tokens(pixels), blip.frame_tokens(pixels), 3e-2)
    copy = linked_copy(folder, tmp_path / "auto")
    raw = json.loads((folder / "config.json").read_text())
    top = {k: v for k, v in raw.items() if k not in ("dtype", "torch_dtype")}
    llm_bf16 = {"text_config": raw["text_config"] | {"torch_dtype": "bfloat16"}}
    for written, want in (({"dtype": "bfloat16"}, torch.bfloat16), (llm_bf16, torch.bfloat16), ({}, torch.float32),
                          ({"torch_dtype": "float16", **llm_bf16}, torch.float16)):
        (copy / "config.json").write_text(json.dumps(top | written))
        assert {p.dtype for p in InstructBLIP.from_pretrained(copy, dtype="auto").parameters()} == {want}, written



def test_auto_takes_dtype_over_torch_dtype_as_transformers_does(hf_folder, tmp_path):
    """A config.json holding both spellings at the top, at odds: "dtype" (5.x's) wins, as transformers' own
    dtype="auto" reads it."""
    from transformers import InstructBlipForConditionalGeneration

    copy = linked_copy(hf_folder[0], tmp_path / "both")
    raw = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(raw | {"dtype": "bfloat16", "torch_dtype": "float16"}))
    theirs = InstructBlipForConditionalGeneration.from_pretrained(copy, dtype="auto")
    assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in InstructBLIP.from_pretrained(copy, dtype="auto").parameters()} == {torch.bfloat16}

def tiny_apt(blip, seed=0):
    """An APT around `blip`'s LLM with a small random encoder and aligner (trained or not, the glue is the same)."""
    torch.manual_seed(seed)
    encoder = AudioMAE(AudioMAEConfig(target_length=64, dim=32, depth=2, heads=2))
    aligner = Aligner(AlignerConfig(vocab_size=blip.tokenizer.vocab_size, audio_dim=32, hidden_size=32, num_layers=2,
                                    num_heads=2, intermediate_size=64, num_queries=3, dropout=0.0))
    return APT(encoder, aligner, blip.llm, blip.tokenizer).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("avqa") / "clip.wav"
    t = np.arange(int(1.0 * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)  # two 0.64 s windows
    return str(path)


def test_the_three_modes_build_the_papers_sequences(blip, clip):
    apt = tiny_apt(blip)
    model = APTBLIP2(blip, apt)
    pixels = torch.stack([blip.processing(f) for f in frames(2)])
    prompt = avqa_prompt("What is making the sound?", ["dog", "car", "bell", "cat"])
    feats = apt.encode_clips([clip])[0]
    visual = blip.frame_prompts(pixels, prompt)  # (2 * Q, D)
    acoustic = apt.clip_prompts([[("audio", clip), ("text", prompt)]], feats)[0][0]  # (2 windows * 3, D)
    text = blip.llm.embed(torch.tensor([2, *blip.tokenizer.encode(prompt, bos=False)]))  # BOS ("</s>") + prompt
    audio_part = torch.cat([apt.audio_token[None], acoustic])
    want = {"audio-visual": [visual, audio_part, text], "video": [visual, text], "audio": [audio_part, text]}
    for mode in MODES:
        x, mask, _ = apt.embed_batch([model.segments(prompt, mode, visual, clip)], feats)
        expected = torch.cat(want[mode])
        assert x.shape[1] == len(expected) and bool(mask.all()), mode
        torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs audio"):
        model.segments(prompt, "audio-visual", visual, None)
    for mode in ("video", "audio-visual"):
        with pytest.raises(ValueError, match=f"mode '{mode}' needs frames"):
            model.segments(prompt, mode, None, clip)
    with pytest.raises(ValueError, match="an AVQA question has 4 options, got 3"):
        avqa_prompt("What is making the sound?", ["dog", "car", "bell"])
    with pytest.raises(ValueError, match="an AVQA question has 4 options, got 5"):  # not the fifth left unlisted
        avqa_prompt("What is making the sound?", ["dog", "car", "bell", "cat", "bird"])
    with pytest.raises(ValueError, match="unknown mode"):
        model.segments(prompt, "smell", visual, clip)


def test_answers_name_an_option_and_rank_all(blip, clip, monkeypatch, tmp_path):
    """Each mode's answer: what the model says greedily in max_new_tokens after AVQA's prompt, the option that names,
    and each option's likelihood after that prompt and after the question alone. The frames go through the image
    encoder once for all modes and both prompts; a clip that cannot be read is an error naming it."""
    from apt_min.audio import AudioError

    model = APTBLIP2(blip, tiny_apt(blip))
    pixels = torch.stack([blip.processing(f) for f in frames(2)])
    options = ["dog", "car", "bell", "cat"]
    encoded, forward = [], blip.vision.forward
    monkeypatch.setattr(blip.vision, "forward", lambda x: encoded.append(len(x)) or forward(x))
    answers = model.answer("What is making the sound?", options, MODES, pixels, clip)
    assert encoded == [2]
    assert set(answers) == set(MODES)
    for named, said, scores, cloze in answers.values():
        for s in (scores, cloze):
            assert s.shape == (4,) and bool(torch.isfinite(s).all()) and bool((s < 0).all())
        assert named == named_option(said, options)
    # the likelihood of each option is that of its text after AVQA's prompt (scores) or after the question alone
    # (cloze), the visual queries reading that same text as their instruction
    for prompt, got in ((avqa_prompt("What is making the sound?", options), answers["video"].scores),
                        ("What is making the sound?", answers["video"].cloze)):
        segments = model.segments(prompt, "video", blip.frame_prompts(pixels, prompt))
        x, mask, labels = model.apt.embed_batch([segments], {}, ["bell"])
        logp = blip.llm(inputs_embeds=x, attention_mask=mask)[0, :-1].log_softmax(-1)
        targets = labels[0, 1:]
        at = targets != -100
        want = logp[at].gather(1, targets[at][:, None]).squeeze(1)[:-1].sum()  # the option's tokens, not EOS
        assert float(got[2]) == pytest.approx(float(want), abs=1e-4)
    prompt = avqa_prompt("What is making the sound?", options)
    said, _ = model.apt.answer_and_rank(model.segments(prompt, "video", blip.frame_prompts(pixels, prompt)), options,
                                        {}, 8)
    assert said and answers["video"].said == said
    # a mode that needs no audio reads none
    assert set(model.answer("What is making the sound?", options, ["video"], pixels)) == {"video"}
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioError, match=re.escape(f"{missing}: no such audio file")):
        model.answer("What is making the sound?", options, ["audio"], None, str(missing))


def test_blocks_apart_changes_only_the_sequence_that_holds_both(blip, clip):
    """avqa_blocks_apart: the visual and the acoustic prompts do not see each other. A mode with one block answers as
    before; audio-visual's scores are those of one full pass with the blocks kept apart (through the cache, as
    answer_and_rank does it), and differ from the plain sequence's."""
    pixels = torch.stack([blip.processing(f) for f in frames(2)])
    options, question = ["dog", "car", "bell", "cat"], "What is making the sound?"
    plain = APTBLIP2(blip, tiny_apt(blip)).answer(question, options, MODES, pixels, clip)
    model = APTBLIP2(blip, tiny_apt(blip), blocks_apart=True)
    apart = model.answer(question, options, MODES, pixels, clip)
    for mode in ("video", "audio"):
        assert apart[mode].said == plain[mode].said and torch.equal(apart[mode].scores, plain[mode].scores)
        assert torch.equal(apart[mode].cloze, plain[mode].cloze)
    assert (apart["audio-visual"].cloze - plain["audio-visual"].cloze).abs().max() > 1e-3
    feats = model.apt.encode_clips([clip])[0]
    segments = model.segments(question, "audio-visual", blip.frame_prompts(pixels, question), clip)
    x, mask, labels, blocks = model.apt.embed_batch([segments], feats, ["bell"], with_blocks=True)
    assert sorted(set(blocks[0].tolist())) == [0, 1, 2] and int((blocks == 1).sum()) == 2 * Q
    assert int((blocks == 2).sum()) == 1 + 2 * 3  # <AUDIO> and two windows' three queries
    with torch.no_grad():
        logp = blip.llm(inputs_embeds=x, attention_mask=mask, blocks=blocks)[0, :-1].log_softmax(-1)
    targets = labels[0, 1:]
    at = targets != -100
    want = logp[at].gather(1, targets[at][:, None]).squeeze(1)[:-1].sum()
    assert float(apart["audio-visual"].cloze[2]) == pytest.approx(float(want), abs=1e-4)

def test_the_apt_answers_in_eval_mode_and_in_instructblips_format_unless_told(blip):
    """APT-BLIP-2 puts the APT in eval mode (its aligner's dropout off) whatever mode it came in, and sets its prompt
    format to InstructBLIP's, or leaves the APT's own where the format given is None."""
    apt = tiny_apt(blip).train()
    assert apt.prompt_format == "plain" and apt.aligner.training
    model = APTBLIP2(blip, apt, prompt_format=None)
    assert model.apt.prompt_format == "plain" and not any(m.training for m in model.apt.modules())
    assert APTBLIP2(blip, tiny_apt(blip)).apt.prompt_format == "instructblip"


def test_named_option():
    options = ["dog", "car", "bell", "cat"]
    assert named_option("2", options) == 2
    assert named_option(" 1 car", options) == 1
    assert named_option("(3) cat", options) == 3
    assert named_option("(2)", options) == 2
    assert named_option("It is a bell.", options) == 2
    assert named_option("a dog or a cat", options) == -1  # several
    assert named_option("7", options) == -1 and named_option("4", options) == -1  # options are 0 to 3
    assert named_option("10 dogs", options) == 0  # "10" is no option's number; its words name the dog
    assert named_option("no idea", options) == -1
    assert named_option("Dog.", options) == 0 and named_option("two bells", options) == 2
    assert named_option("Dog", [" dog ", "car", "bell", "cat"]) == 0  # an option's text is read stripped
    assert named_option("no idea", ["dog", "", "bell", "cat"]) == -1  # an empty option is named by nothing
    assert named_option("", ["dog", "", "bell", "cat"]) == named_option(".", ["dog", "", "bell", "cat"]) == -1  # nor
    assert named_option(" 3", options) == 3  # a number after a space
    assert named_option("0", options) == 0 and named_option("(0) dog", options) == 0  # the first option is 0
    assert named_option("I hear 2 dogs", options) == 0  # a number later in the answer is no option's number
    assert named_option("a car", ["car", "car horn", "bell", "cat"]) == 0  # "car horn" not said: car is named
    assert named_option("Dog.", ["dog", "car", "dog", "cat"]) == 0  # the whole answer: an option listed twice, first
    nested = ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment"]
    assert named_option("Yacht consignment", nested) == 1  # the whole answer
    assert named_option("I think the yacht consignment", nested) == 1  # the longer of two nested names


def test_an_apt_of_another_llm_is_refused(hf_folder, blip, tmp_path):
    """The APT must have been trained against the InstructBLIP's LLM: the same weights, even in other files."""
    folder, hf, _ = hf_folder
    vicuna = tmp_path / "vicuna"  # the same LLM as a folder of its own, as an APT is trained against it
    hf.language_model.save_pretrained(vicuna)
    llm = Llama.from_pretrained(vicuna)
    enc_id = {"path": "enc", "fingerprint": "e"}
    same_id = {"path": str(vicuna), "fingerprint": fingerprint(*model_files(vicuna)), "probe": weight_probe(llm)}
    assert same_id["fingerprint"] != blip.identity["fingerprint"]  # different files ...
    apt = tiny_apt(blip)
    apt.save(tmp_path / "apt-same", enc_id, same_id)
    moved = []
    with pytest.MonkeyPatch.context() as m:  # the APT goes where the LLM is (on a GPU: not left on the CPU)
        m.setattr(APT, "to", lambda self, *a, **kw: moved.append(a) or self)
        plugged = APTBLIP2.plug(blip, tmp_path / "apt-same", apt.encoder, enc_id)  # ... the same weights: accepted
    assert moved == [(blip.llm.lm_head.weight.device,)]
    torch.testing.assert_close(plugged.apt.proj.weight, apt.proj.weight)
    # left to its defaults, a real InstructBLIP's sequence: its prompt format, the two blocks seeing each other
    assert (plugged.apt.prompt_format, plugged.blocks_apart) == ("instructblip", False)
    # an APT that recorded InstructBLIP's own files (no weight probe) is accepted by them
    own_id = {"path": str(folder), "fingerprint": fingerprint(*model_files(folder))}
    apt.save(tmp_path / "apt-own-files", enc_id, own_id)
    assert blip.identity == own_id
    APTBLIP2.plug(blip, tmp_path / "apt-own-files", apt.encoder, enc_id)

    other = Llama(llm.config)  # another LLM of the same shape
    randomize(other)
    other_id = {"path": "other", "fingerprint": "f", "probe": weight_probe(other)}
    apt.save(tmp_path / "apt-other", enc_id, other_id)
    with pytest.raises(CheckpointError, match="trained against the llm"):
        APTBLIP2.plug(blip, tmp_path / "apt-other", apt.encoder, enc_id)
    with pytest.raises(ValueError, match="the APT must be built around the InstructBLIP's own LLM"):
        APTBLIP2(blip, APT(apt.encoder, apt.aligner, other, blip.tokenizer))  # even one of the same shape
    # an APT saved before probes were recorded can be checked by its files only
    apt.save(tmp_path / "apt-old", enc_id, {"path": str(vicuna), "fingerprint": same_id["fingerprint"]})
    with pytest.raises(CheckpointError, match="trained against the llm"):
        APTBLIP2.plug(blip, tmp_path / "apt-old", apt.encoder, enc_id)


def test_the_qformer_tokenizer_is_the_same_in_every_run(tmp_path):
    """train_qformer_tokenizer gives the same vocabulary in every process (the tokenizers library's trainer gave
    another one each time, and with it another vision side): the special tokens, the characters alone and as
    continuations, then whole words by frequency, ties in alphabetical order; a word beyond vocab_size is spelt in
    pieces, nothing is unknown."""
    import subprocess
    import sys

    from apt_min.blip2 import train_qformer_tokenizer

    texts = ["Which object in the picture is making a sound?", "a bell and a siren", "the birdsong; a drum",
             "What can be heard?", "a siren"] * 3
    make = ("import sys; from apt_min.blip2 import train_qformer_tokenizer as t; "
            "t(sys.argv[1].split('|'), sys.argv[2], vocab_size=int(sys.argv[3]))")
    for run in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", make, "|".join(texts), str(tmp_path / run), "2000"], check=True)
    made = {(tmp_path / run / "tokenizer.json").read_bytes() for run in "abc"}
    assert len(made) == 1
    qtok = train_qformer_tokenizer(texts, tmp_path / "d", vocab_size=2000)
    vocab = sorted(qtok.hf.get_vocab(), key=qtok.hf.get_vocab().get)
    chars = sorted(set("".join(texts).lower()) - {" "})
    assert vocab[:5 + 2 * len(chars)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in
                                                                                                  chars)]
    assert vocab[5 + 2 * len(chars):][:4] == ["siren", "the", "and", "be"]  # 6, 6, then 3 times each ("a": a char)
    small = train_qformer_tokenizer(texts, tmp_path / "e", vocab_size=5 + 2 * len(chars) + 1)  # one word: "siren"
    assert small.hf.encode("A siren; birdsong").tokens == ["[CLS]", "a", "siren", ";", "b", "##i", "##r", "##d", "##s",
                                                            "##o", "##n", "##g", "[SEP]"]
    bare = train_qformer_tokenizer(texts, tmp_path / "f", vocab_size=4 + 2 * len(chars))  # below: no whole word
    assert len(bare.hf.get_vocab()) == 5 + 2 * len(chars) and bare.hf.encode("siren").tokens[1:3] == ["s", "##i"]


def test_a_vision_side_saves_loads_and_refuses_another_llm(blip, tmp_path):
    """A vision side trained here (train.py --stage vision) round-trips through save_vision / load_vision around the
    LLM it was trained against, and is refused around another."""
    from apt_min.blip2 import train_qformer_tokenizer
    from apt_min.vision import ImageProcessing, ViTConfig

    qtok = train_qformer_tokenizer(["a picture of a bell", "which object can be seen?"] * 20, tmp_path / "qtok")
    assert qtok(["a bell"])[0][0].tolist()[0] == qtok.hf.token_to_id("[CLS]")  # BERT's framing: [CLS] ... [SEP]
    assert torch.equal(qtok(["A Bell?"])[0], qtok(["a bell?"])[0])  # lower-cased, as it was learned
    vit = ViTConfig(image_size=28, patch_size=14, dim=16, depth=1, heads=2, hidden=32)
    qformer = AlignerConfig(vocab_size=qtok.hf.get_vocab_size(), audio_dim=16, hidden_size=16, num_layers=2,
                            num_heads=2, intermediate_size=32, num_queries=3, dropout=0.0)
    torch.manual_seed(1)
    processing = ImageProcessing(size=28, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), rescale=1 / 200, resample=2)
    side = InstructBLIP(vit, qformer, blip.llm, blip.tokenizer, qtok, processing)
    assert not any(p.requires_grad for p in side.parameters())  # frozen whole (the vision stage unfreezes its part)
    randomize(side.qformer)
    llm_id = {"path": "llm", "fingerprint": "abc", "probe": weight_probe(blip.llm)}
    side.save_vision(tmp_path / "side", llm_id, {"config": {"seed": 7}})
    assert json.loads((tmp_path / "side" / "vision.json").read_text())["config"] == {"seed": 7}
    moved, to = [], InstructBLIP.to
    with pytest.MonkeyPatch.context() as m:  # it goes where the LLM is (on a GPU: not left on the CPU)
        m.setattr(InstructBLIP, "to", lambda self, *a, **kw: moved.append(a) or to(self, *a, **kw))
        back = InstructBLIP.load_vision(tmp_path / "side", blip.llm, blip.tokenizer, llm_id)
    assert moved == [(blip.llm.model.embed_tokens.weight.device,)] and back.identity == llm_id
    assert (back.vision.config, back.qformer.config) == (vit, qformer)  # as saved, and its frames read alike:
    assert torch.equal(back.processing(frames(1)[0]), processing(frames(1)[0]))  # the side's own processing
    pixels = torch.stack([back.processing(f) for f in frames(2)])
    torch.testing.assert_close(back.frame_prompts(pixels, "a bell?"), side.frame_prompts(pixels, "a bell?"))
    other = Llama(blip.llm.config)
    randomize(other)
    for given in ({"path": "other", "fingerprint": "x"}, {"path": "other", "fingerprint": "x", "probe":
                                                            weight_probe(other)}):  # (load_llm records a probe)
        with pytest.raises(CheckpointError, match=r"trained against the llm \{'path': 'llm', 'fingerprint': 'abc'\}, "
                                                  r"but the llm given is \{'path': 'other', 'fingerprint': 'x'\}"):
            InstructBLIP.load_vision(tmp_path / "side", other, blip.tokenizer, given)
    # every tensor of the side must be in its file: one missing is named, not left at its initial value
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "side" / "vision.safetensors")
    save_file({k: v for k, v in stored.items() if k != "proj.weight"}, tmp_path / "side" / "vision.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: proj.weight"):
        InstructBLIP.load_vision(tmp_path / "side", blip.llm, blip.tokenizer, llm_id)


def test_evaluations_loader_plugs_an_apt_into_a_real_instructblip_folder_in_its_format(hf_folder, blip, tmp_path):
    """load_apt_blip2 (what `evaluate.py --task avqa` loads) with --vision_path naming a real InstructBLIP folder: the
    APT trained against its LLM is plugged into InstructBLIP's own sequence format (soft prompts first, then its BOS
    and the text), not the APT's; its features kept apart by the dtype they were computed in."""
    from apt_min import build
    from apt_min.config import load_config

    apt = tiny_apt(blip)
    apt.encoder.save(tmp_path / "encoder.safetensors")
    cfg = load_config("tiny", {"vision_path": str(hf_folder[0]), "run_dir": str(tmp_path / "run"),
                               "encoder_checkpoint": str(tmp_path / "encoder.safetensors")})
    _, encoder_id = build.build_encoder(cfg, "cpu", torch.float32, create=False)
    apt.save(tmp_path / "apt", encoder_id, blip.identity)
    model = build.load_apt_blip2(cfg, tmp_path / "apt")
    assert isinstance(model.blip, InstructBLIP) and model.apt.llm is model.blip.llm
    assert (model.apt.prompt_format, model.blocks_apart) == ("instructblip", False)
    torch.testing.assert_close(model.apt.proj.weight, apt.proj.weight)
    assert model.apt.cache.setting == build.feature_cache(cfg, encoder_id, torch.float32).setting
    bf16 = load_config("tiny", {**vars(cfg), "preset": "tiny", "precision": "bf16"})
    assert build.load_apt_blip2(bf16, tmp_path / "apt").apt.cache.setting.endswith("|torch.bfloat16")
