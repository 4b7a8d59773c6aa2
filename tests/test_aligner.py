"""The aligner against transformers' BLIP-2 / InstructBLIP Q-Formers; its masks; hard negatives; stage-0 losses."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from apt_min import aligner as aligner_module
from apt_min.aligner import (
    Aligner,
    AlignerConfig,
    bidirectional_mask,
    caption_keys,
    hard_negatives,
    multimodal_causal_mask,
    stage0_losses,
    unimodal_mask,
)

CFG = AlignerConfig(vocab_size=50, audio_dim=24, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                    num_queries=5, max_text_len=16, contrast_dim=16, dropout=0.0)

# ours -> transformers (InstructBlipQFormerModel; BLIP-2's query-only model names its embedding norm `layernorm`)
TO_HF = {
    "word_embeddings.weight": "embeddings.word_embeddings.weight",
    "position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embed_norm.{p}": "embeddings.layernorm.{p}",
    "layers.{i}.{a}.query.{p}": "encoder.layer.{i}.{A}.attention.query.{p}",
    "layers.{i}.{a}.key.{p}": "encoder.layer.{i}.{A}.attention.key.{p}",
    "layers.{i}.{a}.value.{p}": "encoder.layer.{i}.{A}.attention.value.{p}",
    "layers.{i}.{a}.out.{p}": "encoder.layer.{i}.{A}.output.dense.{p}",
    "layers.{i}.{a}.norm.{p}": "encoder.layer.{i}.{A}.output.LayerNorm.{p}",
    "layers.{i}.ffn_query.up.{p}": "encoder.layer.{i}.intermediate_query.dense.{p}",
    "layers.{i}.ffn_query.down.{p}": "encoder.layer.{i}.output_query.dense.{p}",
    "layers.{i}.ffn_query.norm.{p}": "encoder.layer.{i}.output_query.LayerNorm.{p}",
    "layers.{i}.ffn_text.up.{p}": "encoder.layer.{i}.intermediate.dense.{p}",
    "layers.{i}.ffn_text.down.{p}": "encoder.layer.{i}.output.dense.{p}",
    "layers.{i}.ffn_text.norm.{p}": "encoder.layer.{i}.output.LayerNorm.{p}",
}
ATTENTIONS = {"self_attn": "attention", "cross_attn": "crossattention"}


def hf_state(aligner):
    """Our state dict under transformers' names, built from the table above (every key is mapped exactly once)."""
    ours, theirs, used = aligner.state_dict(), {}, set()
    for src, dst in TO_HF.items():
        for i in range(aligner.config.num_layers):
            for a, A in ATTENTIONS.items():
                for p in ("weight", "bias"):
                    key = src.format(i=i, a=a, p=p)
                    if key in ours:
                        theirs[dst.format(i=i, A=A, p=p)] = ours[key]
                        used.add(key)
    heads = ("ln_audio", "query_tokens", "audio_proj", "text_proj", "temp", "atm_head", "lm_")
    assert set(ours) - used == {k for k in ours if k.startswith(heads)}  # only what the HF Q-Former lacks
    return theirs


def random_aligner(**kw):
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(**{**CFG.__dict__, **kw})).eval()
    with torch.no_grad():  # beyond BERT's tiny init, so that every path visibly matters
        for name, p in aligner.named_parameters():
            if "norm" in name or name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name != "temp":
                p.normal_(0, 0.3)
    return aligner


def batch(B=3, T=7, N=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, N, CFG.audio_dim, generator=g)
    ids = torch.randint(3, CFG.vocab_size, (B, T), generator=g)
    ids[:, 0] = 1  # BOS
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 3:] = False
    return audio, ids, mask


@pytest.mark.parametrize("eps", [1e-5, 1e-6], ids=["BLIP-2's ln_vision", "InstructBLIP's post_layernorm"])
def test_query_path_matches_blip2_qformer(eps):
    """The query path is BLIP-2's Q-Former, reading the encoder's tokens through ln_audio with the eps the config
    names (the paper preset's 1e-6 is InstructBLIP's vision post_layernorm)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    aligner = random_aligner(input_norm_eps=eps)
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        vocab_size=CFG.vocab_size + 1, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=24, max_position_embeddings=16)).eval()
    text_only = re.compile(r"^embeddings\.(word|position)|\.\d+\.(intermediate|output)\.")  # BLIP-2 has no text
    state = {k.replace("embeddings.layernorm", "layernorm"): v for k, v in hf_state(aligner).items()
             if not text_only.search(k)}
    hf.load_state_dict(state, strict=True)
    aligner, hf = aligner.double(), hf.double()  # float64: the comparison is exact up to rounding on any CPU
    audio = batch()[0].double()
    with torch.no_grad():
        ours = aligner(audio)
        ln_vision = F.layer_norm(audio, (24,), aligner.ln_audio.weight, aligner.ln_audio.bias, eps)
        ref = hf(query_embeds=aligner.query_tokens.expand(3, -1, -1), encoder_hidden_states=ln_vision).last_hidden_state
    assert ours.shape == (3, 5, 32)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()  # measured: 1e-15 relative


@pytest.mark.parametrize("dropout", ["off", "halved"])
def test_instruction_path_matches_instructblip_qformer(monkeypatch, dropout):
    """The instruction path is InstructBLIP's Q-Former. "halved": every dropout module replaced by the same halving
    in both, they still agree, so each dropout (after the embeddings' norm, on each attention's and feed-forward's
    output before the residual) stands where InstructBLIP's does (attention-probability dropout is functional in
    both, off in eval mode)."""
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    if dropout == "halved":
        monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: 0.5 * x)
    aligner = random_aligner()
    hf = InstructBlipQFormerModel(InstructBlipQFormerConfig(
        vocab_size=CFG.vocab_size + 1, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=24, max_position_embeddings=16)).eval()
    hf.load_state_dict(hf_state(aligner), strict=True)
    aligner, hf = aligner.double(), hf.double()
    audio, ids, mask = batch()
    audio = audio.double()
    with torch.no_grad():
        ours = aligner(audio, ids, mask, bidirectional_mask)
        ref = hf(input_ids=ids, attention_mask=torch.cat([torch.ones(3, 5, dtype=torch.long), mask.long()], 1),
                 query_embeds=aligner.query_tokens.expand(3, -1, -1),
                 encoder_hidden_states=aligner.ln_audio(audio)).last_hidden_state
    valid = torch.cat([torch.ones(3, 5, dtype=torch.bool), mask], 1)
    assert (ours - ref)[valid].abs().max() <= 1e-10 * ref.abs().max()  # measured: 2e-15 relative
    assert torch.equal(aligner.instruct(audio, ids, mask), ours[:, :5])


def test_agtg_head_is_berts_lm_prediction_head():
    """AGTG's word prediction (lm_transform, then the decoder tied to the word table) is BERT's LM prediction head,
    as BLIP-2's first stage uses it: dense, GELU, LayerNorm (eps 1e-12), then the word vectors and a bias."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    aligner = random_aligner().double()
    head = BertLMPredictionHead(BertConfig(vocab_size=CFG.vocab_size + 1, hidden_size=32, hidden_act="gelu",
                                           layer_norm_eps=1e-12)).double().eval()
    with torch.no_grad():
        dense, _, norm = aligner.lm_transform
        for mine, theirs in ((dense, head.transform.dense), (norm, head.transform.LayerNorm)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        head.decoder.weight.copy_(aligner.word_embeddings.weight)
        head.decoder.bias.copy_(aligner.lm_decoder.bias)
        h = torch.randn(3, 7, 32, dtype=torch.double)
        ours, ref = aligner.word_logits(aligner.lm_transform(h)), head(h)
    assert ours.shape == (3, 7, CFG.vocab_size + 1)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert aligner.lm_decoder.weight is aligner.word_embeddings.weight  # tied, one parameter


def test_dropout_acts_only_while_training():
    """In eval mode an aligner with dropout computes exactly what the same aligner without it does (attention's
    own dropout included), on every path; in training mode the dropout acts."""
    aligner = random_aligner(dropout=0.3)
    plain = random_aligner(dropout=0.0)
    audio, ids, mask = batch()
    for model in (aligner, plain):
        model.outputs = [model(audio, ids, mask, bidirectional_mask), model.instruct(audio, ids, mask),
                         model.encode_text(ids, mask), model.encode_audio(audio), model(audio)]
    for got, want in zip(aligner.outputs, plain.outputs):
        assert torch.equal(got, want)
    aligner.train()
    assert not torch.equal(aligner(audio), aligner(audio))
    aligner.set_dropout(0.0)
    for model in (aligner, plain):
        model.layers[0].cross_attn.drop.p = 0.0  # only the cross-attention's attention-probability dropout left
        model.layers[0].cross_attn.p = 0.5 * (model is aligner)
    assert not torch.equal(aligner(audio), plain.train()(audio))


def test_set_dropout_reaches_every_dropout_and_is_saved(tmp_path):
    """set_dropout(p) sets every dropout of the aligner, the attention probabilities' included (at 0 a training-mode
    pass is the eval-mode one), and records p in the config, so a saved aligner keeps it; Aligner.load's overrides
    replace what was saved (stage 1 loads stage 0's aligner with its own dropout)."""
    aligner = random_aligner(dropout=0.3)
    audio, ids, mask = batch()
    with torch.no_grad():
        want = aligner(audio, ids, mask, bidirectional_mask)
        aligner.set_dropout(0.0)
        torch.testing.assert_close(aligner.train()(audio, ids, mask, bidirectional_mask), want)
    aligner.set_dropout(0.2)
    assert aligner.config.dropout == 0.2
    aligner.save(tmp_path)
    for overrides, p in (({}, 0.2), ({"dropout": 0.05}, 0.05)):
        again = Aligner.load(tmp_path, **overrides)
        assert again.config.dropout == p and again.layers[0].cross_attn.p == p and again.embed_drop.p == p


def test_initialisation_is_blip2s():
    """A fresh aligner starts as BLIP-2's Q-Former does: BERT's N(0, 0.02) for every linear map, embedding and the
    query tokens, zero biases, unit LayerNorms, the contrastive temperature at 0.07, ln_audio's eps LayerNorm's
    default (BLIP-2's ln_vision)."""
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(vocab_size=4000, audio_dim=768, hidden_size=256, intermediate_size=1024))
    assert aligner.temp.item() == pytest.approx(0.07) and aligner.ln_audio.eps == 1e-5
    assert aligner.query_tokens.std().item() == pytest.approx(0.02, rel=0.03)
    for name, m in aligner.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.numel() >= 10_000:
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.03) and abs(m.weight.mean()) < 1e-3, name
        if isinstance(m, torch.nn.Linear):
            assert not m.bias.any(), name
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and not m.bias.any(), name
    # reading the LLM's words, [DEC] has a vector of its own: it starts as BERT's word vectors do
    words = Aligner(AlignerConfig(vocab_size=50, hidden_size=256, intermediate_size=64, llm_words=64))
    assert words.dec_embedding.std().item() == pytest.approx(0.02, rel=0.2)


def test_text_longer_than_the_position_table_is_refused_by_name():
    aligner = random_aligner()
    ids = torch.ones(1, CFG.max_text_len, dtype=torch.long)
    assert aligner(None, ids).shape == (1, CFG.max_text_len, 32)  # exactly max_text_len: fine
    with pytest.raises(ValueError, match=f"text of {CFG.max_text_len + 1} tokens is longer than max_text_len="
                                         f"{CFG.max_text_len}"):
        aligner(None, torch.ones(1, CFG.max_text_len + 1, dtype=torch.long))


def test_caption_keys_depend_on_the_real_tokens_alone():
    """Equal captions padded to other widths with any pad id (processes pad to their own longest) get one key; a
    caption and the same one with a real token 0 appended do not, nor the same tokens in another order."""
    a = torch.tensor([[5, 9, 7, 0]])
    ones = torch.tensor([[1, 1, 1, 0]])
    wide = torch.tensor([[5, 9, 7, 3, 3, 3]])  # padded with 3
    assert caption_keys(a, ones) == caption_keys(wide, torch.tensor([[1, 1, 1, 0, 0, 0]]))
    assert caption_keys(a[:, :3], ones[:, :3]) != caption_keys(a, torch.ones(1, 4, dtype=torch.bool))
    # the same tokens in another order are another caption ("a dog chases a cat", "a cat chases a dog")
    assert caption_keys(a[:, :3], ones[:, :3]) != caption_keys(a[:, [2, 1, 0]], ones[:, :3])


def test_mask_patterns():
    text_mask = torch.tensor([[True, True, False]])  # 2 queries, 2 tokens and one pad
    x, o = True, False
    expected = {
        bidirectional_mask: [[x, x, x, x, o]] * 5,
        unimodal_mask: [[x, x, o, o, o], [x, x, o, o, o], [o, o, x, x, o], [o, o, x, x, o], [o, o, x, x, o]],
        multimodal_causal_mask: [[x, x, o, o, o], [x, x, o, o, o], [x, x, x, o, o], [x, x, x, x, o],
                                 [x, x, x, x, o]],
    }
    for fn, rows in expected.items():
        got = fn(2, text_mask)
        assert got.shape == (1, 1, 5, 5)
        assert got[0, 0].tolist() == rows, fn.__name__


def test_masks_change_what_the_queries_and_text_hear():
    aligner = random_aligner()
    audio, ids, mask = batch()
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % CFG.vocab_size  # one text token differs (a real token in every row)
    Q = CFG.num_queries
    with torch.no_grad():
        for fn, queries_unchanged in ((unimodal_mask, True), (multimodal_causal_mask, True),
                                      (bidirectional_mask, False)):
            a, b = aligner(audio, ids, mask, fn), aligner(audio, changed, mask, fn)
            assert torch.allclose(a[:, :Q], b[:, :Q], atol=1e-6) == queries_unchanged, fn.__name__
        # causal: a later token never changes an earlier one
        a, b = aligner(audio, ids, mask, multimodal_causal_mask), aligner(audio, changed, mask, multimodal_causal_mask)
        assert torch.allclose(a[:, Q:Q + 2], b[:, Q:Q + 2], atol=1e-6)
        assert not torch.allclose(a[:, Q + 2], b[:, Q + 2], atol=1e-6)
        # unimodal: text does not hear the audio; the queries do
        other = torch.randn_like(audio)
        a, b = aligner(audio, ids, mask, unimodal_mask), aligner(other, ids, mask, unimodal_mask)
        assert torch.allclose(a[:, Q:], b[:, Q:], atol=1e-6) and not torch.allclose(a[:, :Q], b[:, :Q])
        # the text branch alone equals the text slice of a unimodal pass
        assert torch.allclose(aligner(None, ids, mask)[:, 0], a[:, Q], atol=1e-5)


def test_padding_is_never_heard():
    aligner = random_aligner()
    audio, ids, mask = batch()
    junk = ids.masked_fill(~mask, 7)
    with torch.no_grad():
        for fn in (unimodal_mask, bidirectional_mask, multimodal_causal_mask):
            a, b = aligner(audio, ids, mask, fn), aligner(audio, junk, mask, fn)
            valid = torch.cat([torch.ones(3, CFG.num_queries, dtype=torch.bool), mask], 1)
            assert torch.allclose(a[valid], b[valid], atol=1e-6)


def test_hard_negatives_never_return_a_positive():
    g = torch.Generator().manual_seed(0)
    clip = torch.tensor([0, 0, 1, 2, 2, 3])  # clips 0 and 2 appear twice (two captions each)
    ids = torch.tensor([[1, 5, 6], [1, 5, 7], [1, 5, 6], [1, 8, 9], [1, 8, 9], [1, 4, 4]])  # rows 0, 2 same caption
    keys = caption_keys(ids, torch.ones_like(ids, dtype=torch.bool))
    assert keys[0] == keys[2] and keys[3] == keys[4] and len(set(keys.tolist())) == 4
    positives = (clip[:, None] == clip[None]) | (keys[:, None] == keys[None])
    sim = torch.randn(6, 6) * 5 + 20 * positives  # the model prefers the positives: the sampler must not
    for _ in range(200):
        idx, valid = hard_negatives(sim, positives, g)
        assert valid.all() and not positives[torch.arange(6), idx].any()
    everything = torch.ones(2, 2, dtype=torch.bool)  # all pairs positive: no negative exists
    assert not hard_negatives(torch.zeros(2, 2), everything, g)[1].any()
    # at a low temperature the positive dominates the row (similarities / 0.01): its negatives still get drawn, by
    # their own softmax (the second, 0.1 above the others, nearly always)
    sim = torch.tensor([[0.9, -0.3, -0.2, -0.4]]) / 0.01
    drawn = [hard_negatives(sim, torch.tensor([[True, False, False, False]]), g) for _ in range(50)]
    assert all(valid.item() for _, valid in drawn) and sum(idx.item() == 2 for idx, _ in drawn) >= 48
    # drawn, not picked: a negative log 3 above another (3 times its weight) is drawn 3 times in 4, not always
    sim = torch.tensor([[5.0, 0.0, math.log(3.0)]])
    drawn = [hard_negatives(sim, torch.tensor([[True, False, False]]), g)[0].item() for _ in range(400)]
    assert set(drawn) == {1, 2} and 0.68 < drawn.count(2) / 400 < 0.82


def test_stage0_losses_fall_together_when_overfitting():
    torch.manual_seed(0)
    aligner = Aligner(CFG).train()
    audio, ids, mask = batch(B=6, T=8, seed=3)
    ids[torch.arange(6), mask.sum(1) - 1] = 2  # EOS closes each caption
    clip = torch.arange(6)
    opt = torch.optim.AdamW(aligner.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    first = {k: v.item() for k, v in stage0_losses(aligner, audio, ids, mask, clip, generator=g).items()}
    for _ in range(250):  # ATM plateaus, then drops (after about 150 steps here): matching needs both sides
        losses = stage0_losses(aligner, audio, ids, mask, clip, generator=g)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    last = {k: v.item() for k, v in stage0_losses(aligner.eval(), audio, ids, mask, clip, generator=g).items()}
    for k in ("atc", "atm", "agtg"):
        assert last[k] < 0.5 * first[k], (k, first[k], last[k])


def test_stage0_losses_are_blip2s_three_passes(monkeypatch):
    """stage0_losses runs the aligner three times, as BLIP-2's first stage does. ATC under the unimodal mask; ATM
    under the bidirectional mask, on each true pair, each audio with a hard-negative text and each text with a
    hard-negative audio (never one of its positives: another caption of its clip, or the same caption of another
    clip), labelled match / no match, its logits averaged over the queries, each text and each audio with its own
    padding mask; AGTG under the multimodal causal mask, the caption with [DEC] in place of BOS, each token
    predicting the next, label smoothing 0.1. The clips here differ in length (padded, with their masks)."""
    aligner = random_aligner()
    audio, ids, mask = batch(B=4, T=6, seed=5)
    heard = torch.arange(audio.shape[1])[None] < torch.tensor([10, 9, 7, 4])[:, None]  # each clip's real tokens
    audio = audio * heard[..., None]
    ids[3] = ids[0]  # clips 0 and 3 have the same caption: positives of each other
    mask[3] = mask[0]
    clip = torch.tensor([0, 1, 2, 3])
    positives = [{j for j in range(4) if j == i or torch.equal(ids[j], ids[i])} for i in range(4)]
    calls = []
    real = aligner.forward

    def spy(*args):
        calls.append((*args, real(*args)))
        return calls[-1][-1]

    aligner.forward = spy
    drawn_from, draw = [], aligner_module.hard_negatives

    def hard_negatives(sim, *args):
        drawn_from.append(sim.detach().clone())
        return draw(sim, *args)

    monkeypatch.setattr(aligner_module, "hard_negatives", hard_negatives)
    B, Q = 4, CFG.num_queries
    for seed in range(10):
        calls.clear()
        drawn_from.clear()
        losses = stage0_losses(aligner, audio, ids, mask, clip, heard, generator=torch.Generator().manual_seed(seed))
        (a0, t0, m0, f0, e0, h0), (a1, t1, m1, f1, e1, h1), (a2, t2, m2, f2, e2, h2) = calls
        assert torch.equal(e0, heard) and torch.equal(e2, heard) and torch.equal(e1[:2 * B], torch.cat([heard, heard]))
        # ATC: the best-matching query's cosine over the temperature, both ways, against the positives shared out
        # evenly (a caption of two clips counts half for each), label smoothing 0.1
        audio_emb, text_emb = F.normalize(aligner.audio_proj(h0[:, :Q]), dim=-1), F.normalize(
            aligner.text_proj(h0[:, Q]), dim=-1)
        sim = torch.einsum("aqe,te->atq", audio_emb, text_emb).amax(-1) / aligner.temp
        share = torch.tensor([[float(j in positives[i]) / len(positives[i]) for j in range(B)] for i in range(B)])
        atc = sum(F.cross_entropy(x, share, label_smoothing=0.1) for x in (sim, sim.T)) / 2
        torch.testing.assert_close(losses["atc"], atc)
        grads = [torch.autograd.grad(x, aligner.temp, retain_graph=True)[0] for x in (losses["atc"], atc)]
        torch.testing.assert_close(grads[0], grads[1])  # the temperature learns from both directions
        # a wrong text for each audio is drawn by that audio's similarity to every text, a wrong audio for each text
        # by that text's to every audio (the two differ: the matrix is not symmetric)
        assert not torch.allclose(sim, sim.T)
        torch.testing.assert_close(drawn_from, [sim.detach(), sim.detach().T])
        assert (f0, f1, f2) == (unimodal_mask, bidirectional_mask, multimodal_causal_mask)
        assert torch.equal(t0, ids) and torch.equal(a0, audio) and torch.equal(a2, audio)
        # ATM: the true pairs first, then (audio i, a negative text), then (a negative audio, text i)
        assert len(a1) == 3 * B and torch.equal(a1[:B], audio) and torch.equal(t1[:B], ids)
        assert torch.equal(a1[B:2 * B], audio) and torch.equal(t1[2 * B:], ids) and torch.equal(m1[2 * B:], mask)
        for i in range(B):
            assert not any(torch.equal(t1[B + i], ids[j]) for j in positives[i]), (seed, i)  # audio i's wrong text
            said = next(j for j in range(B) if torch.equal(t1[B + i], ids[j]))
            assert torch.equal(m1[B + i], mask[said]), (seed, i)  # with that text's own padding
            other = next(j for j in range(B) if torch.equal(a1[2 * B + i], audio[j]))  # text i's wrong audio
            assert other not in positives[i] and torch.equal(e1[2 * B + i], heard[other]), (seed, i, other)
        labels = torch.tensor([1] * B + [0] * 2 * B)
        atm = F.cross_entropy(aligner.atm_head(h1[:, :Q]).mean(1), labels)
        torch.testing.assert_close(losses["atm"], atm)
        # AGTG
        assert (t2[:, 0] == aligner.dec_id).all() and torch.equal(t2[:, 1:], ids[:, 1:]) and torch.equal(m2, mask)
        logits = aligner.word_logits(aligner.lm_transform(h2[:, Q:-1]))
        agtg = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]], label_smoothing=0.1)
        torch.testing.assert_close(losses["agtg"], agtg)
        torch.testing.assert_close(losses["total"], losses["atc"] + losses["atm"] + losses["agtg"])
    # retrieval and the tagging protocol embed with the branches ATC trained: the same vectors, one side at a time
    aligner.forward = real
    with torch.no_grad():
        torch.testing.assert_close(aligner.encode_text(ids, mask), text_emb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aligner.encode_audio(audio, heard), audio_emb, rtol=1e-5, atol=1e-6)


def test_stage0_losses_ignore_what_the_padding_holds():
    """Whatever ids the padding holds, every stage-0 loss is the same: the text is never heard there, and two equal
    captions (of clips 0 and 3 here) are still found equal, positives of each other, when their padding differs."""
    aligner = random_aligner()
    audio, ids, mask = batch(B=4, T=6, seed=5)
    mask[0, 4:] = False
    ids[3], mask[3] = ids[0], mask[0]
    clean = ids.masked_fill(~mask, 0)
    junk = clean.clone()
    junk[0, 4:], junk[3, 4:] = 7, 9
    with torch.no_grad():
        got = [stage0_losses(aligner, audio, x, mask, torch.arange(4), generator=torch.Generator().manual_seed(2))
               for x in (clean, junk)]
    assert {k: v.item() for k, v in got[1].items()} == pytest.approx({k: v.item() for k, v in got[0].items()},
                                                                     rel=1e-6)


def test_an_unknown_atm_negatives_is_refused_by_name():
    audio, ids, mask = batch()
    with pytest.raises(ValueError, match="atm_negatives='all': expected local or global"):
        stage0_losses(random_aligner(), audio, ids, mask, torch.arange(3), atm_negatives="all")


def test_atc_temperature_is_held_within_blip2s_bounds():
    """BLIP-2 clamps the learned temperature to [0.001, 0.5] before dividing: a trained temperature outside that
    range divides as its bound does, and the bounds themselves are used as they are."""
    from apt_min.aligner import atc_loss

    g = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    positives = torch.eye(4, dtype=torch.bool)
    best = torch.einsum("bqe,ce->bcq", audio, text).amax(-1)  # (B, B): the best-matching query

    def sims(temp):
        return atc_loss(audio, text, torch.tensor(temp), positives)[1]

    torch.testing.assert_close(sims(1e-5), best / 0.001)
    torch.testing.assert_close(sims(0.002), best / 0.002)
    torch.testing.assert_close(sims(0.5), best / 0.5)
    torch.testing.assert_close(sims(3.0), best / 0.5)
    # the parameter itself is held there (as LAVIS does), so a step past a bound is not stuck with no gradient
    aligner = random_aligner()
    audio_in, ids, mask = batch(B=4, T=6, seed=1)
    with torch.no_grad():
        aligner.temp.fill_(0.6)
    stage0_losses(aligner, audio_in, ids, mask, torch.arange(4))["total"].backward()
    assert aligner.temp.item() == pytest.approx(0.5) and aligner.temp.grad.abs().item() > 0


def _distributed_worker(rank, world, rendezvous, audio, ids, mask, clip, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    from apt_min.aligner import atc_loss, gather_with_grad

    aligner = random_aligner()
    B = audio.shape[0] // world
    part = slice(rank * B, (rank + 1) * B)
    a, t = _atc_embeddings(aligner, audio[part], ids[part], mask[part])
    positives = clip[part][:, None] == gather_with_grad(clip[part])[None]
    loss, _, _ = atc_loss(a, t, aligner.temp, positives)
    loss.backward()
    losses = stage0_losses(aligner, audio[part], ids[part], mask[part], clip[part],
                           generator=torch.Generator().manual_seed(7), atm_negatives="local")
    alone = stage0_losses(aligner, audio[part], ids[part], mask[part], clip[part],  # validation: ATM's negatives too
                          generator=torch.Generator().manual_seed(7), across_processes=False)  # from its own pairs
    out[rank] = {"atc": loss.item(), "grad": aligner.query_tokens.grad.clone(),
                 "stage0": {k: v.item() for k, v in losses.items()}, "alone": {k: v.item() for k, v in alone.items()}}
    torch.distributed.destroy_process_group()


def _atc_embeddings(aligner, audio, ids, mask):
    h = aligner(audio, ids, mask, unimodal_mask)
    a = torch.nn.functional.normalize(aligner.audio_proj(h[:, :CFG.num_queries]), dim=-1)
    t = torch.nn.functional.normalize(aligner.text_proj(h[:, CFG.num_queries]), dim=-1)
    return a, t


def _in_two_processes(worker, tmp_path):
    """Four audio-text pairs (texts starting with BOS, one clip each) and what `worker` reports from two gloo
    processes given them (as under torchrun, without a port: a file rendezvous): (audio, ids, mask, clip, out)."""
    audio, ids, mask = batch(B=4, T=6, seed=5)
    ids[:, 0] = 1
    clip = torch.arange(4)
    out = mp.Manager().dict()
    mp.spawn(worker, args=(2, tmp_path / "rendezvous", audio, ids, mask, clip, out), nprocs=2, join=True)
    return audio, ids, mask, clip, out


def test_stage0_across_two_processes(tmp_path, monkeypatch):
    """Two gloo processes with half the batch each (as under torchrun, without a port: a file rendezvous).
    ATC: the mean of their losses equals one process on the whole batch (every text is contrasted with every audio
    of the global batch), and each process's gradient treats the other's features as constants, as BLIP-2 does.
    ATM (atm_negatives="local") and AGTG: each process equals one process on its half alone (hard negatives come
    from its own batch). across_processes=False (validation, every process holding the same pairs): each process equals
    one process on its half alone, every loss, ATM's negatives drawn from its own pairs (not from another's)."""
    import apt_min.aligner as al

    audio, ids, mask, clip, out = _in_two_processes(_distributed_worker, tmp_path)

    aligner = random_aligner()
    whole, _, _ = al.atc_loss(*_atc_embeddings(aligner, audio, ids, mask), aligner.temp, clip[:, None] == clip[None])
    assert (out[0]["atc"] + out[1]["atc"]) / 2 == pytest.approx(whole.item(), rel=1e-5)

    def expected_grad(rank, detach_others):
        """What rank's ATC gradient should be: its loss against the whole batch's features, the other process's half
        entering as constants (detach_others) or, for contrast, as live tensors."""
        aligner = random_aligner()
        a, t = _atc_embeddings(aligner, audio, ids, mask)  # the whole batch, in one process
        mine, other = slice(2 * rank, 2 * rank + 2), slice(2 - 2 * rank, 4 - 2 * rank)
        local_a, local_t = a[mine], t[mine]

        def gathered(local, x):
            rest = x[other].detach() if detach_others else x[other]
            return torch.cat([local, rest] if rank == 0 else [rest, local])

        full = {id(local_a): gathered(local_a, a), id(local_t): gathered(local_t, t)}
        with monkeypatch.context() as m:
            m.setattr(al, "gather_with_grad", lambda x: full[id(x)])
            loss, _, _ = al.atc_loss(local_a, local_t, aligner.temp, clip[mine][:, None] == clip[None])
        loss.backward()
        return aligner.query_tokens.grad

    for rank in (0, 1):
        ref = expected_grad(rank, detach_others=True)
        torch.testing.assert_close(out[rank]["grad"], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
        live = expected_grad(rank, detach_others=False)
        assert (live - ref).abs().max() > 0.01 * ref.abs().max()  # detaching matters: the check can tell

    for rank in (0, 1):
        half = slice(2 * rank, 2 * rank + 2)
        alone = stage0_losses(random_aligner(), audio[half], ids[half], mask[half], clip[half],
                              generator=torch.Generator().manual_seed(7), atm_negatives="local")
        assert out[rank]["stage0"]["atm"] == pytest.approx(alone["atm"].item(), rel=1e-5)
        assert out[rank]["stage0"]["agtg"] == pytest.approx(alone["agtg"].item(), rel=1e-5)
        assert out[rank]["stage0"]["atc"] == pytest.approx(out[rank]["atc"], rel=1e-5)
        assert out[rank]["alone"] == pytest.approx({k: v.item() for k, v in alone.items()}, rel=1e-5)


def _unequal_worker(rank, world, rendezvous, audio, ids, mask, clip, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    part = slice(0, 3) if rank == 0 else slice(3, 4)  # one process skipped two of its clips
    feats, heard = audio[part], None
    if rank == 0:  # and its clips are longer (3 tokens of padding, masked): the global pool has two audio lengths
        feats = torch.cat([feats, torch.randn(3, 3, feats.shape[2], generator=torch.Generator().manual_seed(0))], 1)
        heard = torch.arange(feats.shape[1])[None].expand(3, -1) < audio.shape[1]
    out[rank] = {how: {k: v.item() for k, v in stage0_losses(
        random_aligner(), feats, ids[part], mask[part], clip[part], heard, generator=torch.Generator().manual_seed(7),
        atm_negatives=how).items()} for how in ("local", "global")}
    out[rank] = {**out[rank], "read": _atm_pairs(random_aligner(), feats, ids[part], mask[part], clip[part], heard,
                                                 generator=torch.Generator().manual_seed(7), atm_negatives="global")[2]}
    torch.distributed.destroy_process_group()


def test_stage0_across_processes_with_batches_of_different_sizes(tmp_path, monkeypatch):
    """Under torchrun a process that skipped unreadable clips holds fewer pairs than the others (here 3 and 1), and
    its clips may be padded to another length (here 13 tokens, 10 real, and 10): the gathers still line up
    (all_gather needs equal shapes). Each process's ATC equals its rows' loss against the
    whole batch in one process, and local ATM equals that process's pairs alone (its rows found at their offset)."""
    import apt_min.aligner as al

    audio, ids, mask, clip, out = _in_two_processes(_unequal_worker, tmp_path)
    aligner = random_aligner()
    a, t = _atc_embeddings(aligner, audio, ids, mask)
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 4))):
        mine_a, mine_t = a[rows], t[rows]
        full = {id(mine_a): a, id(mine_t): t}
        with monkeypatch.context() as m:
            m.setattr(al, "gather_with_grad", lambda x, full=full: full[id(x)])
            expected, _, _ = al.atc_loss(mine_a, mine_t, aligner.temp, clip[rows][:, None] == clip[None])
        assert out[rank]["local"]["atc"] == pytest.approx(expected.item(), rel=1e-5)
        assert out[rank]["global"]["atc"] == pytest.approx(expected.item(), rel=1e-5)
        alone = stage0_losses(random_aligner(), audio[rows], ids[rows], mask[rows], clip[rows],
                              generator=torch.Generator().manual_seed(7), atm_negatives="local")
        assert out[rank]["local"]["atm"] == pytest.approx(alone["atm"].item(), rel=1e-5)
        assert math.isfinite(out[rank]["global"]["atm"]) and out[rank]["global"]["atm"] != alone["atm"].item()
    # the shorter process's own clip, padded to the pool's 13 tokens for global ATM: at the end, masked there
    audio_in, ids_in, _, heard_in = out[1]["read"]
    assert audio_in.shape[1] == 13 and torch.equal(audio_in[0, :10], audio[3]) and not audio_in[0, 10:].any()
    assert heard_in[0].tolist() == [True] * 10 + [False] * 3 and torch.equal(ids_in[0], ids[3])


def _atm_pairs(aligner, *args, **kwargs):
    """stage0_losses, how many pairs its ATM head scored (matches and drawn negatives), and what the ATM pass read:
    (audio, ids, text mask, audio mask)."""
    seen, calls, real = [], [], aligner.forward
    hook = aligner.atm_head.register_forward_hook(lambda module, inputs, output: seen.append(len(output)))
    aligner.forward = lambda *a: (calls.append(a), real(*a))[1]
    losses = stage0_losses(aligner, *args, **kwargs)
    hook.remove()
    audio, ids, mask, _, heard = calls[1]
    return {k: v.item() for k, v in losses.items()}, seen[0], (audio, ids, mask, heard)


def _atm_worker(rank, world, rendezvous, audio, ids, mask, clip, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    aligner, B = random_aligner(), audio.shape[0] // world
    part = slice(rank * B, (rank + 1) * B)
    width = int(mask[part].sum(1).max())  # each process's texts as long as its longest
    out[rank] = {how: _atm_pairs(aligner, audio[part], ids[part, :width], mask[part, :width], clip[part],
                                 generator=torch.Generator().manual_seed(7), atm_negatives=how)
                 for how in ("local", "global")}
    torch.distributed.destroy_process_group()


def test_atm_negatives_can_come_from_every_process(tmp_path):
    """Each process holds the two captions of one clip, so its own batch offers ATM no negative at all: with
    atm_negatives="local" ATM scores the 2 matches alone; with "global" (BLIP-2's way) it also draws a wrong text
    and a wrong audio for each pair from the other process (6 pairs), texts of different lengths padded to the
    longest. ATC and AGTG do not change; with one process the two settings are one."""
    audio, ids, mask = batch(B=4, T=6, seed=5)
    mask[2:, 4:] = False  # the second process's captions are shorter: its text tensors are 4 wide, the first's 6
    clip = torch.tensor([0, 0, 1, 1])
    out = mp.Manager().dict()
    mp.spawn(_atm_worker, args=(2, tmp_path / "rendezvous", audio, ids, mask, clip, out), nprocs=2, join=True)
    aligner, Q = random_aligner(), CFG.num_queries
    for rank in (0, 1):
        (local, local_pairs, _), (world, world_pairs, read) = out[rank]["local"], out[rank]["global"]
        assert local_pairs == 2 and world_pairs == 6
        assert local["atc"] == pytest.approx(world["atc"], rel=1e-6) and local["atm"] != world["atm"]
        assert local["agtg"] == pytest.approx(world["agtg"], rel=1e-5)
        # what ATM read: this process's pairs, each audio with a text of the other process's clip and each text with
        # an audio of it, every text right-padded to the longest (6) with its own mask, every audio with its own
        audio_in, ids_in, mask_in, heard_in = read
        mine, theirs = [2 * rank, 2 * rank + 1], [2 - 2 * rank, 3 - 2 * rank]
        assert ids_in.shape[1] == 6 and heard_in.all()
        for i, j in enumerate(mine):
            assert torch.equal(audio_in[i], audio[j]) and torch.equal(mask_in[i], mask[j])
            assert torch.equal(ids_in[i][mask[j]], ids[j][mask[j]])  # its own text, right-padded as its mask
            assert torch.equal(ids_in[4 + i][mask[j]], ids[j][mask[j]])
            assert torch.equal(audio_in[2 + i], audio[j]) and torch.equal(mask_in[4 + i], mask[j])
            text = next(k for k in theirs if torch.equal(mask_in[2 + i], mask[k]) and torch.equal(
                ids_in[2 + i][mask[k]], ids[k][mask[k]]))  # a wrong text, whole, right-padded
            assert text in theirs and any(torch.equal(audio_in[4 + i], audio[k]) for k in theirs)
        with torch.no_grad():  # and the loss is those six pairs' match / no-match cross-entropy
            h = aligner(audio_in, ids_in, mask_in, bidirectional_mask, heard_in)
            atm = F.cross_entropy(aligner.atm_head(h[:, :Q]).mean(1), torch.tensor([1, 1, 0, 0, 0, 0]))
        assert world["atm"] == pytest.approx(atm.item(), rel=1e-5)
    one = {how: _atm_pairs(random_aligner(), audio, ids, mask, clip, generator=torch.Generator().manual_seed(7),
                           atm_negatives=how) for how in ("local", "global")}
    assert one["local"][0]["atm"] == one["global"][0]["atm"] and one["global"][1] == 12


def test_stage0_batch_reads_each_caption_between_bos_and_eos():
    """stage0_batch: each caption as stage 0 reads it, BOS ... EOS, right-padded with its mask; the clips as float32
    tokens (a whole clip's windows read as one sequence), padded with the mask of the real ones; one id per path."""
    from types import SimpleNamespace

    from apt_min.aligner import clip_ids, stage0_batch
    from apt_min.tokenizer import pad_ids

    tok = SimpleNamespace(encode=lambda text, bos=True, eos=False: [1] * bos + [ord(c) - 90 for c in text] + [2] * eos,
                          pad=lambda seqs: pad_ids(seqs, 0))
    long, short = torch.randn(2, 4, 6).half(), torch.randn(3, 6).half()  # two windows of 4 tokens; one of 3
    got = stage0_batch(["abc", "d"], [long, short], ["x.wav", "y.wav"], tok, "cpu")
    assert got.text_ids.tolist() == [[1, 7, 8, 9, 2], [1, 10, 2, 0, 0]]
    assert got.text_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert got.audio_feats.dtype == torch.float32 and got.audio_feats.shape == (2, 8, 6)
    assert torch.equal(got.audio_feats[0], long.reshape(8, 6).float()) and got.audio_mask.sum(1).tolist() == [8, 3]
    assert torch.equal(got.clip_ids, clip_ids(["x.wav", "y.wav"]))


def test_clips_of_different_lengths_are_padded_and_masked():
    """pad_tokens reads a whole clip's windows (W, N, Da) as one sequence and pads shorter clips, with the mask of
    the real tokens; the queries never hear the padding: each clip's embedding equals its own, alone, and every
    stage-0 loss is unchanged when a batch is padded further."""
    from apt_min.aligner import pad_tokens

    aligner = random_aligner().eval()
    g = torch.Generator().manual_seed(3)
    long, short = torch.randn(3, 4, CFG.audio_dim, generator=g), torch.randn(1, 4, CFG.audio_dim, generator=g)
    feats, heard = pad_tokens([long, short])
    assert feats.shape == (2, 12, CFG.audio_dim) and heard.sum(1).tolist() == [12, 4]
    assert torch.equal(feats[0], long.reshape(12, -1)) and not feats[1, 4:].any()
    assert pad_tokens([long, long])[1] is None  # one length: no mask
    with torch.no_grad():
        both = aligner.encode_audio(feats, heard)
        torch.testing.assert_close(both[1], aligner.encode_audio(short)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both[0], aligner.encode_audio(long.reshape(1, 12, -1))[0], rtol=1e-5, atol=1e-6)
        audio, ids, mask = batch(B=4, T=6, seed=5)
        clip = torch.arange(4)
        padded = torch.cat([audio, torch.randn(4, 5, CFG.audio_dim)], dim=1)  # 5 more tokens each, masked out
        real = torch.arange(padded.shape[1])[None].expand(4, -1) < audio.shape[1]
        for how in ("local", "global"):
            plain = stage0_losses(aligner, audio, ids, mask, clip, generator=torch.Generator().manual_seed(1),
                                  atm_negatives=how)
            more = stage0_losses(aligner, padded, ids, mask, clip, real, torch.Generator().manual_seed(1), how)
            for k in ("atc", "atm", "agtg"):
                assert more[k].item() == pytest.approx(plain[k].item(), rel=1e-5), (how, k)


def _others_detached(x, mine):
    """x (B, ...) with every row outside `mine` detached."""
    keep = torch.zeros(x.shape[0], dtype=torch.bool)
    keep[mine] = True
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(keep.view(shape), x, x.detach())


def test_clip_ids_and_retrieval_recall():
    from apt_min.aligner import clip_ids, retrieval_r1

    ids = clip_ids(["data/a.wav", "data/b.wav", "data/a.wav"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1]
    # the same in every process (a caption's positives may sit in another process's batch), whatever its hash seed
    code = "from apt_min.aligner import clip_ids; print(clip_ids(['data/a.wav', 'data/b.wav']).tolist())"
    other = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert other == [f"{ids[:2].tolist()}\n"] * 2
    aligner = random_aligner()
    # embeddings made by hand: clip i's queries point at axis i; caption j at the axis of clip owner_of[j] or not
    audio = torch.eye(3)[:, None, :].expand(3, 2, 3)  # (A, Q, E)
    owner = torch.tensor([0, 0, 1, 2])
    aligner.encode_audio = lambda feats, heard=None: audio
    for texts, a2t, t2a in ((torch.eye(3)[owner], 1.0, 1.0),  # every caption matches its clip
                            # clip 0's captions point at clip 1: clip 1 retrieves caption 0 (wrong), clip 0 scores all
                            # captions 0 and takes the first (its own), clip 2 its own; captions: 2 of 4 right
                            (torch.eye(3)[torch.tensor([1, 1, 1, 2])], 2 / 3, 2 / 4)):
        aligner.encode_text = lambda ids, mask, texts=texts: texts
        got = retrieval_r1(aligner, None, None, None, owner)
        assert got == pytest.approx({"a2t_r1": a2t, "t2a_r1": t2a})
    # the best-matching query decides, not the queries' mean: clip 0's queries point at axes 0 and 2, clip 1's both
    # at (0.8, 0.6, 0); caption 0 (axis 0) scores 1 with clip 0 and 0.8 with clip 1 (by the mean 0.5 and 0.8),
    # caption 1 (axis 1) 0 and 0.6; clip 1 prefers caption 0 (0.8 > 0.6): R@1 1/2 audio to text, 1 text to audio
    aligner.encode_audio = lambda feats, heard=None: torch.tensor([[[1.0, 0, 0], [0, 0, 1]], [[0.8, 0.6, 0]] * 2])
    aligner.encode_text = lambda ids, mask: torch.eye(3)[:2]
    got = retrieval_r1(aligner, None, None, None, torch.tensor([0, 1]))
    assert got == pytest.approx({"a2t_r1": 1 / 2, "t2a_r1": 1.0})


# ------------------------------------------------------------------------ words read from the LLM's table (small)


def test_words_read_through_the_llms_table_are_mapped_rows_of_it(tmp_path):
    """aligner_words=llm: a word's vector is its row of the LLM's table through the trained map, [DEC] its own
    vector; the AGTG decoder is tied to those same vectors; the table is never part of the aligner's weights, so a
    saved aligner is small and must be given the table again to run."""
    torch.manual_seed(0)
    table = torch.randn(CFG.vocab_size, 12)
    aligner = random_aligner(llm_words=12)
    with pytest.raises(RuntimeError, match="attach_llm_words"):
        aligner.embed_words(torch.tensor([[1]]))
    for wrong in (table[:, :8], table[:-1]):  # another width, or another vocabulary
        with pytest.raises(ValueError, match=r"\(50, 12\)"):
            aligner.attach_llm_words(wrong)
    aligner.attach_llm_words(table)
    ids = torch.tensor([[3, 7, CFG.vocab_size, 0]])
    got = aligner.embed_words(ids)[0]
    W, b = aligner.word_map.weight, aligner.word_map.bias
    torch.testing.assert_close(got[:2], table[[3, 7]] @ W.T + b)
    torch.testing.assert_close(got[2], aligner.dec_embedding)
    h = torch.randn(2, CFG.hidden_size)
    vectors = torch.cat([table @ W.T + b, aligner.dec_embedding[None]])
    torch.testing.assert_close(aligner.word_logits(h), h @ vectors.T + aligner.lm_decoder.bias)
    last = torch.tensor([[CFG.vocab_size - 1]])  # the vocabulary's last word is a word of the table, not [DEC]
    torch.testing.assert_close(aligner.embed_words(last)[0, 0], table[-1] @ W.T + b)
    # the table is read, never trained, even one that would take a gradient
    live = table.clone().requires_grad_()
    aligner.attach_llm_words(live)
    (aligner.embed_words(ids).sum() + aligner.word_logits(h).sum()).backward()
    assert live.grad is None and aligner.word_map.weight.grad is not None
    aligner.attach_llm_words(table.bfloat16())  # an LLM held in bf16: its rows read in the map's dtype
    torch.testing.assert_close(aligner.embed_words(last)[0, 0], table[-1].bfloat16().float() @ W.T + b)
    aligner.attach_llm_words(table)
    assert not any(v.shape[:1] == (CFG.vocab_size,) for v in aligner.state_dict().values())
    aligner.save(tmp_path)
    again = Aligner.load(tmp_path).eval()
    audio = torch.randn(1, 6, CFG.audio_dim)
    with pytest.raises(RuntimeError, match="attach_llm_words"):
        again(audio, ids)
    again.attach_llm_words(table)
    torch.testing.assert_close(again(audio, ids), aligner(audio, ids))


def test_an_apt_gives_its_aligner_the_llms_own_table():
    """Inside APT the aligner reads the frozen LLM's embedding table itself: the same tensor, never a copy, and no
    gradient reaches it."""
    from apt_min.audiomae import AudioMAE, AudioMAEConfig
    from apt_min.llama import Llama, LlamaConfig
    from apt_min.model import APT

    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1))
    aligner = Aligner(AlignerConfig(**{**CFG.__dict__, "llm_words": 16}))
    encoder = AudioMAE(AudioMAEConfig(target_length=32, num_mel_bins=32, dim=CFG.audio_dim, depth=2, heads=2))
    apt = APT(encoder, aligner, llm, tokenizer=None)
    assert aligner.__dict__["llm_table"] is llm.model.embed_tokens.weight
    aligner.embed_words(torch.tensor([[1, 2]])).sum().backward()
    assert llm.model.embed_tokens.weight.grad is None and aligner.word_map.weight.grad is not None
    assert "aligner.llm_table" not in apt.trainable_state()


def test_proj_from_words_scores_the_llms_words_as_the_aligner_does():
    """proj_init=words: a query's projection, against the LLM's words less their mean, gives each word the score
    the aligner's own dot product with that word's vector gives it (up to one positive factor), lands at a word's
    typical distance from the mean word, and is refused for an aligner with a word table of its own."""
    from apt_min.audiomae import AudioMAE, AudioMAEConfig
    from apt_min.errors import SettingError
    from apt_min.llama import Llama, LlamaConfig
    from apt_min.model import APT

    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1))
    encoder = AudioMAE(AudioMAEConfig(target_length=32, num_mel_bins=32, dim=CFG.audio_dim, depth=2, heads=2))
    aligner = Aligner(AlignerConfig(**{**CFG.__dict__, "llm_words": 64}))
    with torch.no_grad():
        llm.model.embed_tokens.weight.add_(1.0)  # the words share a common offset, as a trained LLM's do
        aligner.word_map.weight.normal_()  # as after training: not the init's scale
        aligner.word_map.bias.normal_()
    apt = APT(encoder, aligner, llm, tokenizer=None)
    apt.start_proj_from_words()
    table = llm.model.embed_tokens.weight.detach()
    mean = table.mean(0)
    torch.testing.assert_close(apt.proj.bias.detach(), mean)
    queries = F.layer_norm(torch.randn(64, CFG.hidden_size), (CFG.hidden_size,))  # the aligner's output's size
    with torch.no_grad():
        reached = (apt.proj(queries) - mean) @ (table - mean).T  # (64, V)
        aligner_scores = queries @ (aligner.word_map(table) - aligner.word_map(mean)).T
        length = (apt.proj(queries) - mean).norm(dim=1).mean()
    factor = reached.norm() / aligner_scores.norm()
    torch.testing.assert_close(reached, factor * aligner_scores, rtol=1e-4, atol=1e-4)
    spread = (table - mean).norm(dim=1).mean()
    assert 0.8 < float(length / spread) < 1.25
    own = APT(encoder, Aligner(CFG), llm, tokenizer=None)
    with pytest.raises(SettingError, match="aligner_words=llm"):
        own.start_proj_from_words()


def test_each_stage0_loss_trains_every_part_its_pass_reads():
    """Backpropagated alone, each loss reaches every weight its pass reads, on the query side (the queries, the audio's
    input norm, cross-attention) and on the text side (word and position embeddings), and its own head; no loss
    reaches another's head. A detach in the wrong place leaves every loss value as it was and silently stops part of
    the aligner learning: only the gradients show it."""
    torch.manual_seed(0)
    aligner = Aligner(CFG)
    audio, ids, mask = batch(B=4, T=7)
    reached = {}
    for loss in ("atc", "atm", "agtg"):
        aligner.zero_grad()
        losses = stage0_losses(aligner, audio, ids, mask, torch.arange(4), generator=torch.Generator().manual_seed(0))
        losses[loss].backward()
        reached[loss] = {n for n, p in aligner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    both_sides = {"query_tokens", "ln_audio.weight", "ln_audio.bias", "word_embeddings.weight",
                  "position_embeddings.weight", "embed_norm.weight", "layers.0.cross_attn.query.weight",
                  "layers.0.cross_attn.value.weight", "layers.0.self_attn.key.weight"}
    heads = {"atc": {"audio_proj.weight", "text_proj.weight", "temp"}, "atm": {"atm_head.weight", "atm_head.bias"},
             "agtg": {"lm_transform.0.weight", "lm_transform.2.weight", "lm_decoder.bias"}}
    for loss, own in heads.items():
        assert both_sides | own <= reached[loss], (loss, sorted(both_sides | own - reached[loss]))
        others = set().union(*(h for k, h in heads.items() if k != loss))
        assert not others & reached[loss], (loss, sorted(others & reached[loss]))
    assert "layers.0.ffn_query.up.weight" in reached["atc"] & reached["atm"] & reached["agtg"]
    assert "layers.0.ffn_text.up.weight" in reached["atc"] & reached["atm"] & reached["agtg"]


def test_retrieval_scores_a_padded_clip_as_the_clip_alone():
    """Validation's retrieval (stage 0's R@1) over clips of different lengths, padded to the longest: a padded clip
    with its mask scores every caption as the clip alone does; the queries never hear the padding."""
    from apt_min.aligner import retrieval_similarity

    aligner = random_aligner()
    audio, ids, mask = batch(B=3, T=7)
    short = audio[:, :6]
    heard = torch.arange(10)[None].expand(3, -1) < 6
    with torch.no_grad():
        alone = retrieval_similarity(aligner, short, ids, mask)
        padded = retrieval_similarity(aligner, F.pad(short, (0, 0, 0, 4)), ids, mask, heard)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def test_every_presets_contrastive_space_is_blip2s_256_wide():
    """The ATC projections map to BLIP-2's 256 dimensions (its embed_dim) in every preset: config.py leaves the
    width to AlignerConfig."""
    from apt_min.config import load_config

    for preset in ("tiny", "small", "paper"):
        assert load_config(preset).aligner_config(vocab_size=10, llm_dim=8).contrast_dim == 256, preset
