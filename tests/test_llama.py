"""The decoder against transformers' LlamaForCausalLM: logits, generation, KV cache, padding.

Float tolerances are relative to the scale of what is compared (helpers.assert_close_rel) and sit >= 10x above the
error measured with AVX-512 kernels and with torch's generic ones (ATEN_CPU_CAPABILITY=default), so they hold on any
CPU. Parity with transformers is checked in float64, as in float32 the rounding floor alone (float32 vs float64
logits) reaches 1.4e-5 of the scale at 100 positions. In float64 the two computations are equal (measured: 0.0), but
RMSNorm still normalises in float32 (as transformers' does), and one float32 rounding that falls differently moves
the logits by up to 4.4e-7 of their scale (measured): hence 1e-5.
"""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, hf_llama

from apt_min.llama import KVCache, Llama, LlamaConfig, RMSNorm, SharedPrefix, attend, causal_padding_mask, top_k_top_p

CONFIGS = {"mha-untied": dict(kv_heads=4, tied=False), "gqa-tied": dict(kv_heads=2, tied=True)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf, folder = hf_llama(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    # Vicuna ships in shards: every parity test below goes through the sharded loading path
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    assert (folder / "model.safetensors.index.json").is_file()
    return hf, Llama.from_pretrained(folder)


@pytest.fixture(scope="module")
def pair64(pair):
    """Float64 copies of both models, for comparisons where exactness is the point."""
    return tuple(copy.deepcopy(m).double() for m in pair)


@torch.no_grad()
def test_logits_match_transformers(pair64):
    hf, ours = pair64
    ids = torch.randint(3, 96, (3, 17))
    assert_close_rel(ours(ids), hf(ids).logits, 1e-5)
    # right padding (training batches): positions are the same either way, padding keys are hidden
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    assert_close_rel(ours(ids, attention_mask=mask)[mask.bool()], hf(ids, attention_mask=mask).logits[mask.bool()],
                     1e-5)


@torch.no_grad()
def test_a_head_width_of_its_own_matches_transformers(tmp_path):
    """config.json's head_dim, where it is not hidden_size / heads (as in Gemma-style and some Llama-family configs):
    the projections are as wide as heads x head_dim, and the logits are transformers'."""
    hf, folder = hf_llama(tmp_path, shards=False, head_dim=32)  # 4 heads of 32 in a 64-wide model
    ours = Llama.from_pretrained(folder).double()
    assert ours.config.head_dim == 32 and ours.model.layers[0].self_attn.q_proj.out_features == 128
    ids = torch.randint(3, 96, (2, 11))
    assert_close_rel(ours(ids), hf.double()(ids).logits, 1e-5)
    got = ours.generate(ids, max_new_tokens=5, eos_token_id=-1)  # through the KV cache, heads of their own width
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 11:])



@torch.no_grad()
def test_far_positions_and_a_large_norm_epsilon_match_transformers(tmp_path):
    """Rotary angles from exact positions far into a sequence (past 256, where bfloat16 no longer holds every
    integer), and RMSNorm with the config's own epsilon (0.5: large enough to show against activations of order 1;
    the other tests' 1e-5 hides in the rounding): the logits are transformers'."""
    hf, folder = hf_llama(tmp_path, shards=False, rms_norm_eps=0.5, max_position_embeddings=512)
    ours = Llama.from_pretrained(folder).double()
    assert ours.config.rms_norm_eps == 0.5
    ids = torch.randint(3, 96, (1, 300))
    assert_close_rel(ours(ids)[0, 250:], hf.double()(ids).logits[0, 250:], 1e-5)


def test_a_bf16_llms_rotary_tables_are_computed_in_fp32_as_transformers_does():
    """Positions far past 256 (where bfloat16 no longer holds every integer) and angles of hundreds of radians: the
    angles are formed and turned into cos/sin in fp32, and only the tables are rounded to the model's bf16, so they are
    transformers' to bf16 rounding (4e-3 of the scale; an angle rounded to bf16 first is off by up to 2 radians)."""
    from transformers import LlamaConfig as HFConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from apt_min.llama import rope_cos_sin, rope_frequencies

    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024)
    positions = torch.arange(1000)[None]  # (1, T)
    theirs = LlamaRotaryEmbedding(HFConfig(**shape))(torch.zeros(1, 1000, 16, dtype=torch.bfloat16), positions)
    ours = rope_cos_sin(rope_frequencies(LlamaConfig(**shape)), positions, torch.bfloat16)
    for got, ref in zip(ours, theirs):
        assert got.dtype == ref.dtype == torch.bfloat16 and got.shape == (1, 1, 1000, 16)
        assert_close_rel(got[:, 0], ref, 1e-2)


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
@torch.no_grad()
def test_a_checkpoint_with_one_kind_of_bias_matches_transformers(tmp_path, bias):
    """attention_bias and mlp_bias are separate flags (Qwen-style checkpoints have the one, others the other): each
    gives biases to its own projections only, and the logits are transformers'."""
    hf, folder = hf_llama(tmp_path, shards=False, **{bias: True})
    ours = Llama.from_pretrained(folder).double()
    has_bias = {name.rsplit(".", 2)[-2] for name, _ in ours.named_parameters() if name.endswith(".bias")}
    assert has_bias == ({"q_proj", "k_proj", "v_proj", "o_proj"} if bias == "attention_bias" else
                        {"gate_proj", "up_proj", "down_proj"})
    ids = torch.randint(3, 96, (2, 9))
    assert_close_rel(ours(ids), hf.double()(ids).logits, 1e-5)


@torch.no_grad()
def test_inputs_embeds_and_logits_at(pair):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 9))
    full = ours(ids)
    assert torch.equal(ours(inputs_embeds=ours.embed(ids)), full)
    at = torch.zeros(2, 9, dtype=torch.bool)
    at[0, 3], at[1, 7], at[1, 8] = True, True, True
    # only the vocabulary matmul runs on other shapes: measured <= 3.7e-7 of the scale
    assert_close_rel(ours(ids, logits_at=at), full[at], 1e-5)  # (3, V)
    assert ours(ids, logits_at=at).shape == (3, 96)


@torch.no_grad()
def test_sdpa_equals_written_out_attention(pair64):
    _, ours = pair64
    ids = torch.randint(3, 96, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :4] = False  # left padding exercises the padded-row rule
    fused = ours(ids, attention_mask=mask)
    for m in ours.modules():
        if hasattr(m, "sdpa"):
            m.sdpa = False
    manual = ours(ids, attention_mask=mask)
    for m in ours.modules():
        if hasattr(m, "sdpa"):
            m.sdpa = True
    # measured <= 6.1e-7 of the scale in float64 (the written-out softmax runs in float32), 1.6e-6 in float32
    assert_close_rel(manual[mask], fused[mask], 1e-5)


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


def test_gradient_checkpointing_changes_memory_not_results(pair64, monkeypatch):
    """APT trains with the LLM frozen and `gradient_checkpointing` on: the loss and the gradients (to the soft
    prompts, and to the weights should they be trained) must be those of the plain forward, and the checkpointing
    must really happen (each block runs again in backward), except in the last `blocks_kept` blocks, which keep their
    activations (grad_checkpointing_keep: less recomputation for more memory)."""
    _, ours = pair64
    ours = copy.deepcopy(ours).train()
    ids, target = torch.randint(3, 96, (2, 8)), torch.randint(3, 96, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # right padding: the padding mask must reach the recomputed blocks too
    block_runs = []  # a pre-hook: the recomputation stops early, once it has what backward needs, before the end
    for i, block in enumerate(ours.model.layers):
        block.register_forward_pre_hook(lambda *_, i=i: block_runs.append(i))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run(checkpointing, frozen, kept=0):
        ours.gradient_checkpointing, ours.blocks_kept = checkpointing, kept
        ours.zero_grad(set_to_none=True)
        for p in ours.parameters():
            p.requires_grad_(not frozen)
        x = ours.embed(ids).detach().requires_grad_(True)
        loss = F.cross_entropy(ours(inputs_embeds=x, attention_mask=mask)[mask], target[mask])
        loss.backward()
        return {"loss": loss, "inputs_embeds": x.grad} | {n: p.grad for n, p in ours.named_parameters()
                                                          if p.grad is not None}

    L = ours.config.num_hidden_layers
    for frozen in (True, False):
        plain = run(False, frozen)
        assert len(calls) == 0 and block_runs == list(range(L))
        assert frozen or "model.layers.0.self_attn.q_proj.weight" in plain
        for kept in (0, 1, L):
            block_runs.clear()
            checkpointed = run(True, frozen, kept)
            # each block but the last `kept` runs again in backward, the last first
            assert len(calls) == L - kept
            assert block_runs == list(range(L)) + list(reversed(range(L - kept)))
            calls.clear()
            assert checkpointed.keys() == plain.keys()
            for name in plain:
                assert_close_rel(checkpointed[name], plain[name], 1e-12)  # the same float64 operations: measured 0.0
        block_runs.clear()
    ours.gradient_checkpointing, ours.blocks_kept = True, 0
    with torch.no_grad():  # nothing to save for backward: no checkpointing
        ours(ids)
    ours(ids[:, :3], cache=KVCache(ours.config, 2, 3, torch.float64, "cpu"))  # nor through a cache (generate's)
    assert len(calls) == 0



def test_gradient_checkpointing_reads_the_shared_prefix(pair64):
    """Checkpointed blocks attend to a SharedPrefix's keys and values, as the plain ones do (APT trains so after an
    instruct LLM's system turn): the loss is the whole rows', and the gradient to the inputs the plain forward's."""
    _, ours = pair64
    ours = copy.deepcopy(ours)
    ids = torch.randint(3, 96, (2, 10))
    ids[1, :4] = ids[0, :4]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    prefix = SharedPrefix(ours, ids[0, :4])
    with torch.no_grad():
        whole = ours(ids, attention_mask=mask)[:, 4:][mask[:, 4:]].logsumexp(-1).sum()
    got = {}
    for checkpointing in (False, True):
        ours.gradient_checkpointing = checkpointing
        x = ours.embed(ids[:, 4:]).detach().requires_grad_(True)
        loss = ours(inputs_embeds=x, attention_mask=mask, prefix=prefix)[mask[:, 4:]].logsumexp(-1).sum()
        loss.backward()
        got[checkpointing] = loss, x.grad
    assert_close_rel(got[False][0], whole, 1e-5)  # as the parity tests allow (see above)
    assert_close_rel(got[True][0], got[False][0], 1e-12)  # the same float64 operations: measured 0.0
    assert_close_rel(got[True][1], got[False][1], 1e-12)

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


@pytest.mark.parametrize("dtype, scale", [(torch.float16, 300.0), (torch.bfloat16, 1.0)])
def test_rms_norm_in_half_precision_is_transformers(dtype, scale):
    """RMSNorm normalises in float32 whatever the model's dtype, casts back, then scales by its weight in the model's
    dtype, as transformers' LlamaRMSNorm does: in float16, activations of a few hundred (whose squares overflow
    float16) come out finite and right, and in both half dtypes the result is transformers' to the bit (the same
    operations in the same order; a weight that is not all ones makes the two roundings visible)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 64) * scale
    got = ours.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.equal(got, ref.to(dtype)(x.to(dtype)))
    # and near float32's: half precision's own roundings (input, normalised value, product) measured 5.1e-4 (float16)
    # and 4.7e-3 (bfloat16) of the scale
    assert_close_rel(got, ours.float()(x), 5e-2)


def test_attend_grouped_query_matches_repeated_heads():
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    ref = attend(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), None, True, sdpa=False)
    assert_close_rel(attend(q, k, v, None, True), ref, 1e-5)  # measured <= 1.7e-7 of the scale


# ------------------------------------------------------------------------------------------------------ generation

def _hf_new_tokens(hf, ids, mask=None, **kw):
    out = hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), pad_token_id=0,
                      **{"do_sample": False, **kw})
    return out[:, ids.shape[1]:]


def _trim(row, eos):
    """Tokens up to and including the first EOS (what follows is padding); eos: one id or a list."""
    row, eos = row.tolist(), {eos} if isinstance(eos, int) else set(eos)
    return next((row[:i + 1] for i, t in enumerate(row) if t in eos), row)


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


@pytest.mark.parametrize("num_beams", [1, 3])
def test_list_of_eos_ids_matches_transformers(pair, num_beams):
    """Llama-3-style configs list several EOS ids: a row ends at whichever comes first."""
    hf, ours = pair
    ids = torch.randint(3, 96, (3, 7))
    free = ours.generate(ids, max_new_tokens=14, num_beams=num_beams, eos_token_id=-1)
    eos = [int(free[0, 3]), int(free[1, 5])]
    assert eos[0] != eos[1]
    ref = _hf_new_tokens(hf, ids, max_new_tokens=14, num_beams=num_beams, eos_token_id=eos)
    got = ours.generate(ids, max_new_tokens=14, num_beams=num_beams, eos_token_id=eos, pad_token_id=0)
    if num_beams == 1:  # transformers pads finished rows with pad_token_id too: the whole output is compared
        assert torch.equal(got, ref)
    for r, g in zip(ref, got):  # its beam search pads finished rows with eos[0] (seen in 5.24): trimmed
        assert _trim(g, eos) == _trim(r, eos)
    assert got.shape[1] == max(len(_trim(r, eos)) for r in ref)
    assert {_trim(g, eos)[-1] for g in got} >= set(eos)  # both ids ended a row


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=4, length_penalty=0.6),
                                      dict(num_beams=2, length_penalty=1.5)])  # longer hypotheses favoured
def test_beam_search_among_many_endings_matches_transformers(pair, settings):
    """EOS among the best candidates at many steps (as EOS, the ids the rows' free beams emit at one step, for each of
    several steps): beams end while others must go on (enough candidates are kept for that), finished hypotheses
    compete for their slots until a prompt is done (with longer hypotheses favoured, length penalty 1.5, a later one
    would often beat those kept: transformers' rule still closes the prompt), and the output is as wide as its
    longest row."""
    hf, ours = pair
    ids = torch.randint(3, 96, (3, 7))
    free = ours.generate(ids, max_new_tokens=14, eos_token_id=-1, **settings)
    early = 0
    for step in range(1, 8):
        eos = sorted({int(t) for t in free[:, step]})
        ref = _hf_new_tokens(hf, ids, max_new_tokens=14, eos_token_id=eos, **settings)
        got = ours.generate(ids, max_new_tokens=14, eos_token_id=eos, pad_token_id=0, **settings)
        for r, g in zip(ref, got):
            assert _trim(g, eos) == _trim(r, eos), (step, eos)
        assert got.shape[1] == max(len(_trim(r, eos)) for r in ref), (step, eos)
        early += got.shape[1] < 14
    assert early or settings.get("length_penalty", 1.0) > 1  # every row ended early for some choice (unless long
    # hypotheses are favoured)


def test_without_pad_token_id_finished_rows_are_padded_with_the_first_eos(pair):
    """With several EOS ids and no pad_token_id, a row that has ended is filled with the first EOS id, whichever
    ended it, as transformers does: the whole output is transformers'."""
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (3, 7))
    free = ours.generate(ids, max_new_tokens=12, eos_token_id=-1)
    eos = [int(free[2, 2]), int(free[0, 3])]
    assert eos[0] != eos[1]
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                      eos_token_id=eos)[:, 7:]
    got = ours.generate(ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, ref)
    # a row ended by the second EOS, early, and padded with the first
    ends = [len(_trim(g, eos)) for g in got]
    assert any(g[n - 1] == eos[1] and n < got.shape[1] for g, n in zip(got.tolist(), ends))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_runs_the_llm_once_per_new_token(pair, num_beams):
    """The pass over the prompt gives the first token and one pass per token gives the next: n new tokens cost n
    passes, none spent on logits that would be thrown away (after the last token, or, greedy, once every row has
    ended)."""
    _, ours = pair
    passes = []
    hook = ours.model.norm.register_forward_hook(lambda *_: passes.append(1))
    try:
        ids = torch.randint(3, 96, (2, 6))
        assert ours.generate(ids, max_new_tokens=7, num_beams=num_beams, eos_token_id=-1).shape[1] == 7
        assert len(passes) == 7
        if num_beams == 1:
            eos = [int(t) for t in ours.generate(ids, max_new_tokens=7, eos_token_id=-1)[:, 2]]
            passes.clear()
            got = ours.generate(ids, max_new_tokens=7, eos_token_id=eos)
            assert got.shape[1] == len(passes) <= 3  # both rows end by their third token
    finally:
        hook.remove()


def _bigram_llama(tmp_path, logits: dict):
    """A one-layer transformers Llama whose next token depends on the current one alone, with the logits chosen:
    16 tokens, one-hot embeddings, blocks that add nothing (o_proj and down_proj zero), and an lm_head that turns
    the normed one-hot of token i into logits[i] (a row of 16; rows not given: nearly flat, distinct values). Beam
    search can then be led through a chosen scenario. Returns (the transformers model, ours loaded from its folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V = 16
    cfg = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    table = torch.tensor([logits.get(i, [-0.01 * j for j in range(V)]) for i in range(V)])  # (current, next)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(torch.eye(V))
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
        hf.model.layers[0].mlp.down_proj.weight.zero_()
        hf.lm_head.weight.copy_(table.T * (1 / V + 1e-5) ** 0.5)  # RMSNorm scales a one-hot by 1 / sqrt(1/16 + eps)
    hf.save_pretrained(tmp_path)
    return hf, Llama.from_pretrained(tmp_path)


TOKENS = dict(P=3, A=4, B=5, C=6, D=7, E1=8, E2=9, E3=10)  # the tokens of the scenarios below


def _row(**at):
    """Logits of the 16 tokens: -100 (never chosen) except at the tokens named."""
    row = [-100.0] * 16
    for name, value in at.items():
        row[TOKENS[name]] = value
    return row


def _beam_outputs(hf, ours, eos):
    """Ours and transformers' answers to the prompt P, by beam search with 2 beams, trimmed after the EOS."""
    ids = torch.tensor([[TOKENS["P"]]])
    ref = _hf_new_tokens(hf, ids, max_new_tokens=10, num_beams=2, eos_token_id=eos)
    got = ours.generate(ids, max_new_tokens=10, num_beams=2, eos_token_id=eos, pad_token_id=0)
    return _trim(got[0], eos), _trim(ref[0], eos)


def test_beam_search_keeps_a_beam_behind_several_endings(tmp_path):
    """After P the best tokens are A, then three EOS ids, then B; after A all 16 are about equally likely, after B the
    first EOS is certain. Of 2 beams, A and B go on: (1 + 3 EOS ids) x 2 candidates are kept, as transformers keeps,
    so B is not lost behind the three endings, and B E1 (score -1.82 / 2) beats E1 alone (-1.52)."""
    hf, ours = _bigram_llama(tmp_path, {3: _row(A=0.0, E1=-0.1, E2=-0.2, E3=-0.3, B=-0.4),
                                        5: _row(E1=100.0)})
    got, ref = _beam_outputs(hf, ours, [8, 9, 10])
    assert got == ref == [5, 8]


def test_beam_search_stops_when_the_best_beam_only_ties_the_worst_finished(tmp_path):
    """After P: E1 (log p -0.31), A (-1.51); after A: E2 or C, equally likely; after C and D: D, certainly. At the
    second step A E2 fills the last finished slot with -2.21 / 2, and the best running beam, A C, scores exactly as
    much: it cannot do better, and the prompt is closed (transformers' rule: go on only while strictly better), so the
    answer is E1, although A C D D ... would have scored -2.21 / 10 at the length limit."""
    hf, ours = _bigram_llama(tmp_path, {3: _row(E1=0.0, A=-1.2, B=-2.7), 4: _row(E2=0.0, C=0.0),
                                        6: _row(D=100.0), 7: _row(D=100.0)})
    got, ref = _beam_outputs(hf, ours, [8, 9])
    assert got == ref == [8]


def test_beam_search_fills_a_row_that_ended_with_pad_token_id(tmp_path):
    """Beam search returns each row up to its EOS, then pad_token_id to the width of the longest row (here the
    prompt P of the tie above ends at once, while after C, D follows D to the length limit)."""
    _, ours = _bigram_llama(tmp_path, {3: _row(E1=0.0, A=-1.2, B=-2.7), 4: _row(E2=0.0, C=0.0),
                                        6: _row(D=100.0), 7: _row(D=100.0)})
    got = ours.generate(torch.tensor([[3], [6]]), max_new_tokens=10, num_beams=2, eos_token_id=[8, 9], pad_token_id=15)
    assert got.tolist() == [[8] + [15] * 9, [7] * 10]



def test_token_0_can_be_the_eos(tmp_path):
    """eos_token_id=0 (SmolLM2's <|endoftext|> is id 0) ends a row as any other id does, as in transformers, rather
    than falling back to the config's EOS: after P the bigram model says 0, and 0 again after it."""
    hf, ours = _bigram_llama(tmp_path, {3: [0.0] + [-100.0] * 15})
    ids = torch.tensor([[TOKENS["P"]]])
    assert _hf_new_tokens(hf, ids, max_new_tokens=6, eos_token_id=0).tolist() == [[0]]
    for num_beams in (1, 2):
        assert ours.generate(ids, max_new_tokens=6, num_beams=num_beams, eos_token_id=0).tolist() == [[0]]
    assert ours.generate(ids, max_new_tokens=6).tolist() == [[0] * 6]  # the config's EOS (2) never comes

def test_what_cannot_be_done_is_refused_by_name(pair):
    """Beam search with sampling; a config whose heads are not a multiple of its key/value heads; both or neither of
    input_ids and inputs_embeds; a cache and a shared prefix together; an attention mask or blocks of another length
    than past + T: each is refused, saying what is wrong."""
    _, ours = pair
    ids = torch.randint(3, 96, (2, 5))
    with pytest.raises(ValueError, match="beam search with sampling is not supported"):
        ours.generate(ids, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    for given in (dict(input_ids=ids, inputs_embeds=ours.embed(ids)), {}):
        with pytest.raises(ValueError, match="pass exactly one of input_ids and inputs_embeds"):
            ours(**given)
    cache = KVCache(ours.config, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="pass a cache or a shared prefix, not both"):
        ours(ids, cache=cache, prefix=SharedPrefix(ours, ids[0, :3]))
    with pytest.raises(ValueError, match=re.escape("attention_mask has shape (2, 4), expected (2, 5)")):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=re.escape("blocks has shape (2, 4), expected (2, 5)")):
        ours(ids, blocks=torch.zeros(2, 4, dtype=torch.long))


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
    # a repetition penalty counts each row's own tokens, not the padding before them
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams, eos_token_id=eos,
                          repetition_penalty=1.3)
    for p, row in zip(prompts, batch):
        alone = ours.generate(p[None], max_new_tokens=12, num_beams=num_beams, eos_token_id=eos,
                              repetition_penalty=1.3)[0]
        assert _trim(row, eos) == _trim(alone, eos)


def test_generate_rejects_right_padding(pair):
    _, ours = pair
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, -1] = False
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(torch.randint(3, 96, (2, 5)), attention_mask=mask)


@pytest.mark.parametrize("settings", [{}, dict(do_sample=True), dict(num_beams=3)])
def test_no_new_tokens_is_an_empty_answer_in_every_mode(pair, settings):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 5))
    assert ours.generate(ids, max_new_tokens=0, **settings).shape == (2, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 0, got -1"):
        ours.generate(ids, max_new_tokens=-1, **settings)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7),
    dict(temperature=1.5),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(temperature=1.3, top_k=10, top_p=0.9),
    dict(temperature=1.2, repetition_penalty=1.3),
])
def test_sampling_matches_transformers(pair, settings):
    """Both draw with torch.multinomial from the global RNG, one draw per step over the same probabilities, so the
    same seed gives the same tokens: temperature, top-k and top-p are checked exactly, not just "looks random"."""
    hf, ours = pair
    ids = torch.randint(3, 96, (3, 7))
    torch.manual_seed(123)
    # transformers' own defaults would add top_k=50: spell out "no filtering" for the settings not tested
    ref = _hf_new_tokens(hf, ids, max_new_tokens=14, eos_token_id=95,
                         **{"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **settings})
    torch.manual_seed(123)
    got = ours.generate(ids, max_new_tokens=14, eos_token_id=95, pad_token_id=0, do_sample=True, **settings)
    assert torch.equal(got, ref)


def test_sampling_limits_and_seeds(pair):
    _, ours = pair
    ids = torch.randint(3, 96, (2, 5))
    greedy = ours.generate(ids, max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=-1, do_sample=True, top_k=1), greedy)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=-1, do_sample=True, top_p=1e-6), greedy)
    a, b, c = (ours.generate(ids, max_new_tokens=8, eos_token_id=-1, do_sample=True, temperature=5.0,
                             generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, temperature=1.5)])
def test_streamer_receives_the_returned_tokens(pair, settings):
    """streamer(tokens (B,)) is called once per step, in order; what it received, stacked, is what generate
    returns, padding of finished rows included."""
    _, ours = pair
    ids = torch.randint(3, 96, (3, 7))
    seed = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    eos = int(ours.generate(ids, max_new_tokens=12, eos_token_id=-1, generator=seed(), **settings)[0, 2])
    streamed = []
    got = ours.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, generator=seed(),
                        streamer=lambda t: streamed.append(t.clone()), **settings)
    assert len(_trim(got[0], eos)) < got.shape[1]  # row 0 ended early: later steps stream its padding
    assert all(t.shape == (3,) for t in streamed)
    assert torch.equal(torch.stack(streamed, 1), got)


def test_beam_search_refuses_a_streamer(pair):
    """Beam search settles its tokens only at the end: asked to stream, it says so instead of never calling the
    streamer (transformers refuses too)."""
    _, ours = pair
    streamed = []
    with pytest.raises(ValueError, match="cannot stream"):
        ours.generate(torch.randint(3, 96, (2, 5)), max_new_tokens=6, num_beams=3, streamer=streamed.append)
    assert streamed == []


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(top_k_top_p(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.6) == [True, True, False, False]
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.7) == [True, True, False, False]
    assert kept(top_k=10) == [True] * 4  # more than there are: all, as transformers' top-k keeps


# -------------------------------------------------------------------------------------------------- rotary settings

def _assert_logits_match(hf, ours, T=40):
    ids = torch.randint(3, 96, (2, T))
    with torch.no_grad():
        assert_close_rel(copy.deepcopy(ours).double()(ids), copy.deepcopy(hf).double()(ids).logits, 1e-5)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    hf, folder = hf_llama(tmp_path, shards=False, rope_parameters={"rope_theta": 500.0, **scaling})
    ours = Llama.from_pretrained(folder)
    # theta is read into rope_theta alone: the scaling settings are the config's, no more, as save_pretrained writes
    assert ours.config.rope_scaling == scaling and ours.config.rope_theta == 500.0
    _assert_logits_match(hf, ours)


# config.json rotary fields as transformers 4.x wrote them (Vicuna's era) -> the same settings in 5.x spelling
OLD_CONFIGS = {
    "v1.3, 4.28: no rope fields, no num_key_value_heads": ({}, {"rope_type": "default", "rope_theta": 10000.0}),
    "v1.5, 4.31: rope_scaling null": ({"rope_scaling": None}, {"rope_type": "default", "rope_theta": 10000.0}),
    "v1.5-16k, 4.31: linear, no rope_theta": ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                                              {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "4.3x: rope_theta, rope_scaling null": ({"rope_theta": 500.0, "rope_scaling": None},
                                            {"rope_type": "default", "rope_theta": 500.0}),
    "4.3x: rope_theta, linear": ({"rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
                                 {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
}


@pytest.mark.parametrize("old, new", list(OLD_CONFIGS.values()), ids=list(OLD_CONFIGS))
def test_transformers_4_config_spelling(tmp_path, old, new):
    """A config.json rewritten by hand into the 4.x spelling gives the logits of transformers 5 built with the
    equivalent rope_parameters."""
    hf, folder = hf_llama(tmp_path, kv_heads=4, shards=False, rope_parameters=new)
    raw = json.loads((folder / "config.json").read_text())
    for k in ("rope_parameters", "head_dim", "dtype"):  # 5.x only
        del raw[k]
    if not old:  # before grouped-query attention the field did not exist
        del raw["num_key_value_heads"]
    raw.update(old, torch_dtype="float16", transformers_version="4.31.0")
    (folder / "config.json").write_text(json.dumps(raw))
    _assert_logits_match(hf, Llama.from_pretrained(folder))



# the rotary settings given twice, at odds (a 4.x config.json that 5.x fields were added to by hand) -> what
# transformers 5 makes of it: rope_scaling, where given, replaces rope_parameters whole (its rope_theta included), and
# a rope_theta inside the dict chosen comes before the top-level one
AT_ODDS = {
    "rope_scaling over rope_parameters": {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 500.0},
                                          "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "rope_parameters' theta over the top-level one": {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                                                      "rope_theta": 700.0},
    "rope_scaling's theta over the top-level one": {"rope_scaling": {"type": "linear", "factor": 4.0,
                                                                     "rope_theta": 500.0}, "rope_theta": 700.0},
}


@pytest.mark.parametrize("fields", list(AT_ODDS.values()), ids=list(AT_ODDS))
def test_rotary_settings_given_twice_read_as_transformers_reads_them(tmp_path, fields):
    from transformers import LlamaForCausalLM

    _, folder = hf_llama(tmp_path, shards=False)
    raw = json.loads((folder / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")} | fields
    (folder / "config.json").write_text(json.dumps(raw))
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    ours = Llama.from_pretrained(folder)
    theirs = hf.config.rope_parameters
    assert ours.config.rope_theta == theirs["rope_theta"]
    assert (ours.config.rope_scaling or {}).get("factor") == theirs.get("factor")
    _assert_logits_match(hf, ours)

def test_blocks_apart_mask_drawing():
    """causal_padding_mask's drawing for blocks kept apart: t V V A A q (APT-BLIP-2's avqa_blocks_apart)."""
    blocks = torch.tensor([[0, 1, 1, 2, 2, 0]])
    m, causal = causal_padding_mask(None, 6, 0, "cpu", blocks)
    assert not causal
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 0, 0, 1, 0, 0],   # the second block does not see the first
                             [1, 0, 0, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # the text after sees both
    assert torch.equal(m[0, 0], expected)
    # with left padding, and for the last two queries after four cached positions
    padded = torch.cat([blocks.new_zeros(1, 1), blocks], 1)
    m, _ = causal_padding_mask(torch.tensor([[0, 1, 1, 1, 1, 1, 1]]), 7, 0, "cpu", padded)
    assert torch.equal(m[0, 0, 1:, 1:], expected) and not bool(m[0, 0, 1:, 0].any())
    m, _ = causal_padding_mask(None, 2, 4, "cpu", blocks)
    assert torch.equal(m[0, 0], expected[4:])
    # one query after the cached positions (a step of generation): the text after, and the second block's last
    for past in (5, 4):
        m, _ = causal_padding_mask(None, 1, past, "cpu", blocks[:, :past + 1])
        assert torch.equal(m[0, 0], expected[past:past + 1, :past + 1])
    # one block (or none) leaves the causal mask as it was
    assert causal_padding_mask(None, 6, 0, "cpu", torch.tensor([[0, 1, 1, 1, 0, 0]])) == (None, True)


@torch.no_grad()
def test_a_block_kept_apart_does_not_see_the_other(pair):
    """With blocks apart, what the second block of soft prompts computes does not depend on the first block at all,
    while the text after them reads both; without, the second block reads the first."""
    llm = pair[1]
    torch.manual_seed(0)
    D = llm.config.hidden_size
    text, first, second, after = (torch.randn(1, n, D) for n in (3, 4, 5, 2))
    other = torch.randn(1, 4, D)  # another first block
    blocks = torch.tensor([[0] * 3 + [1] * 4 + [2] * 5 + [0] * 2])
    out = {}
    for name, f in (("first", first), ("other", other)):
        x = torch.cat([text, f, second, after], 1)
        out[name, True] = llm(inputs_embeds=x, blocks=blocks)[0]
        out[name, False] = llm(inputs_embeds=x)[0]
    b2 = slice(7, 12)
    assert_close_rel(out["first", True][b2], out["other", True][b2], 1e-6)
    assert (out["first", False][b2] - out["other", False][b2]).abs().max() > 1e-2  # joint: the block reads the other
    assert (out["first", True][-1] - out["other", True][-1]).abs().max() > 1e-2  # the text after reads both
    assert_close_rel(out["first", True][:7], out["first", False][:7], 1e-6)  # what comes before is as it was


# ------------------------------------------------------------------------------------------------ shared prefix

@torch.no_grad()
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-5), (torch.bfloat16, 5e-2)])
def test_a_shared_prefix_gives_the_whole_sequences_logits(pair, dtype, rel):
    """Rows that all begin with the same tokens, run as a SharedPrefix and then their own tokens (right-padded): the
    logits after the prefix are those of the whole rows run at once. The prefix is held in the LLM's own dtype, a
    bfloat16 LLM's included (outside autocast), and its pass computes no logits (only keys and values)."""
    llm = copy.deepcopy(pair[1]).to(dtype)
    ids = torch.randint(3, 96, (2, 11))
    ids[1, :4] = ids[0, :4]
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 9:] = False
    rows = []
    hook = llm.lm_head.register_forward_hook(lambda _, args, __: rows.append(args[0].shape[0]))
    try:
        prefix = SharedPrefix(llm, ids[0, :4])
    finally:
        hook.remove()
    assert rows == [0]  # the vocabulary projection ran on no position
    assert prefix.length == 4 and prefix.k.dtype == prefix.v.dtype == dtype
    got = llm(ids[:, 4:], attention_mask=mask, prefix=prefix)  # (2, 7, V)
    whole = llm(ids, attention_mask=mask)[:, 4:]
    # measured 0.0 in both dtypes: the same operations on the same values. Other CPUs' kernels may block the matmuls
    # of the two shapes differently: float64 as the parity tests allow (RMSNorm's float32 step, see above), bfloat16
    # a dozen of its roundings (2^-8 each)
    assert_close_rel(got[mask[:, 4:]], whole[mask[:, 4:]], rel)


def test_a_llama_built_with_tied_embeddings_holds_one_table(tmp_path):
    """Llama(config) with tie_word_embeddings (the tiny preset's stand-in LLM is built so): lm_head is the embedding
    table itself, as in transformers' LlamaForCausalLM, so what save_pretrained writes (the table once) reads back
    into the same logits."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    ours = Llama(cfg).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path)
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(Llama.from_pretrained(tmp_path)(ids), ours(ids))
