"""The decoder against transformers' LlamaForCausalLM: logits, generation, KV cache, padding."""

import pytest
import torch
from helpers import hf_llama

from apt_min.llama import Llama, attend, causal_padding_mask, top_k_top_p

CONFIGS = {"mha-untied": dict(kv_heads=4, tied=False), "gqa-tied": dict(kv_heads=2, tied=True)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf, folder = hf_llama(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    return hf, Llama.from_pretrained(folder)


def test_checkpoint_is_sharded(pair, tmp_path):
    _, folder = hf_llama(tmp_path)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    assert (folder / "model.safetensors.index.json").is_file()


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(3, 96, (3, 17))
    assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
    # right padding (training batches): positions are the same either way, padding keys are hidden
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    diff = (hf(ids, attention_mask=mask).logits - ours(ids, attention_mask=mask))[mask.bool()]
    assert diff.abs().max() <= 1e-4


@torch.no_grad()
def test_inputs_embeds_and_logits_at(pair):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 9))
    full = ours(ids)
    assert torch.equal(ours(inputs_embeds=ours.embed(ids)), full)
    at = torch.zeros(2, 9, dtype=torch.bool)
    at[0, 3], at[1, 7], at[1, 8] = True, True, True
    assert torch.allclose(ours(ids, logits_at=at), full[at], atol=1e-6)  # (3, V)
    assert ours(ids, logits_at=at).shape == (3, 96)


def test_sdpa_equals_written_out_attention(pair):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False  # left padding exercises the padded-row rule
    with torch.no_grad():
        fused = ours(ids, attention_mask=mask)
        for m in ours.modules():
            if hasattr(m, "sdpa"):
                m.sdpa = False
        manual = ours(ids, attention_mask=mask)
        for m in ours.modules():
            if hasattr(m, "sdpa"):
                m.sdpa = True
    assert (fused - manual)[mask].abs().max() <= 1e-5


def test_gradients_reach_inputs_embeds_of_frozen_model(pair):
    _, ours = pair
    for p in ours.parameters():
        p.requires_grad_(False)
    x = ours.embed(torch.randint(3, 96, (2, 8))).clone().requires_grad_(True)
    at = torch.zeros(2, 8, dtype=torch.bool)
    at[:, -3:] = True
    ours(inputs_embeds=x, logits_at=at).logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x.grad[:, -3:].abs().sum() > 0


def test_mask_drawings():
    m, causal = causal_padding_mask(torch.tensor([[0, 0, 1, 1, 1]]), 5, 0, "cpu")
    assert not causal
    expected = torch.tensor([[1, 0, 0, 0, 0],   # padding sees itself only
                             [0, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected)
    assert causal_padding_mask(None, 5, 0, "cpu") == (None, True)
    assert causal_padding_mask(None, 1, 7, "cpu") == (None, False)
    # two new queries after three cached keys: offset causal
    m, _ = causal_padding_mask(None, 2, 3, "cpu")
    assert torch.equal(m[0, 0], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


def test_attend_grouped_query_matches_repeated_heads():
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    ref = attend(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), None, True, sdpa=False)
    assert torch.allclose(attend(q, k, v, None, True), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ generation

def _hf_new_tokens(hf, ids, mask=None, **kw):
    out = hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                      do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def _trim(row, eos):
    """Tokens up to and including the first EOS (what follows is padding)."""
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def _eos_that_occurs(hf, ids):
    """A token the model emits a few steps in, used as EOS so that stopping is exercised."""
    return int(_hf_new_tokens(hf, ids, max_new_tokens=6, eos_token_id=None)[0, 3])


@pytest.mark.parametrize("settings", [
    dict(num_beams=1),
    dict(num_beams=1, repetition_penalty=1.3),
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=0.6, repetition_penalty=1.2),
])
def test_generate_matches_transformers(pair, settings):
    hf, ours = pair
    ids = torch.randint(3, 96, (3, 7))
    for eos in (95, _eos_that_occurs(hf, ids)):
        ref = _hf_new_tokens(hf, ids, max_new_tokens=14, eos_token_id=eos, **settings)
        got = ours.generate(ids, max_new_tokens=14, eos_token_id=eos, pad_token_id=0, **settings)
        for r, g in zip(ref, got):
            assert _trim(g, eos) == _trim(r, eos)
        assert got.shape[1] == max(len(_trim(r, eos)) for r in ref)


def test_kv_cache_equals_recomputing(pair):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 6))
    got = ours.generate(ids, max_new_tokens=10, eos_token_id=-1)
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 6:])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_equals_one_by_one(pair, num_beams):
    hf, ours = pair
    prompts = [torch.randint(3, 96, (n,)) for n in (9, 4, 6)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, True
    eos = _eos_that_occurs(hf, prompts[0][None])
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams, eos_token_id=eos)
    for p, row in zip(prompts, batch):
        alone = ours.generate(p[None], max_new_tokens=12, num_beams=num_beams, eos_token_id=eos)[0]
        assert _trim(row, eos) == _trim(alone, eos)
    # and the same through embeddings, the way APT's soft prompts arrive
    via_embeds = ours.generate(inputs_embeds=ours.embed(ids), attention_mask=mask, max_new_tokens=12,
                               num_beams=num_beams, eos_token_id=eos)
    assert torch.equal(via_embeds, batch)
    ref = _hf_new_tokens(hf, ids, mask.long(), max_new_tokens=12, num_beams=num_beams, eos_token_id=eos)
    for r, g in zip(ref, batch):
        assert _trim(g, eos) == _trim(r, eos)


def test_generate_rejects_right_padding(pair):
    _, ours = pair
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, -1] = False
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(torch.randint(3, 96, (2, 5)), attention_mask=mask)


def test_sampling(pair):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 5))
    greedy = ours.generate(ids, max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=-1, do_sample=True, top_k=1), greedy)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=-1, do_sample=True, top_p=1e-6), greedy)
    a, b, c = (ours.generate(ids, max_new_tokens=8, eos_token_id=-1, do_sample=True, temperature=5.0,
                             generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(top_k_top_p(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.6) == [True, True, False, False]
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.7) == [True, True, False, False]


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    hf, folder = hf_llama(tmp_path, shards=False, rope_parameters={"rope_theta": 500.0, **scaling})
    ours = Llama.from_pretrained(folder)
    assert ours.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(3, 96, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
