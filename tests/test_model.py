"""APT glue: interleaving, labels, what trains and what stays frozen, saving and loading, generation."""

import numpy as np
import pytest
import soundfile as sf
import torch

from apt_min.aligner import Aligner, AlignerConfig
from apt_min.audiomae import AudioMAE, AudioMAEConfig
from apt_min.checkpoint import CheckpointError
from apt_min.llama import Llama, LlamaConfig
from apt_min.model import APT
from apt_min.tokenizer import Tokenizer, train_sentencepiece

TEXTS = ["Summarize the audio with key words.", "bell, siren", "This is a sound of hum.", "How many times?", "3"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apt")
    train_sentencepiece(TEXTS * 50, tmp / "tokenizer.model", vocab_size=320)
    tok = Tokenizer(tmp)
    torch.manual_seed(0)
    encoder = AudioMAE(AudioMAEConfig(target_length=64, dim=32, depth=2, heads=2))
    llm = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2))
    pretrain_to_copy(llm, tok)
    clips = []
    for i, seconds in enumerate((0.5, 0.6, 1.5)):  # the last one spans three 0.64 s windows
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(tmp / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t)).astype(np.float32), 16000)
        clips.append(str(tmp / f"clip{i}.wav"))
    return tmp, tok, encoder, llm, clips


def pretrain_to_copy(llm, tok, steps=150):
    """A frozen random LLM can hardly be steered by soft prompts; a pretrained one can (the paper's Vicuna, the
    tiny preset's stand-in). Here: a few steps of "<answer> <question> <answer>" texts, so the LLM learns to copy
    from its context, and soft prompts can later play the part of the first <answer>."""
    docs = [tok.encode(f"{a} {q}", eos=False) + tok.encode(a, bos=False) + [tok.eos_id]
            for a in ("3", "bell, siren", "hum", "bell", "siren, hum", "2") for q in ("How many times?", "Summarize")]
    ids, mask = tok.pad(docs)
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = llm(ids[:, :-1], attention_mask=mask[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def make_apt(parts, seed=0):
    _, tok, encoder, llm, _ = parts
    torch.manual_seed(seed)
    aligner = Aligner(AlignerConfig(vocab_size=tok.vocab_size, audio_dim=32, hidden_size=32, num_layers=2,
                                    num_heads=2, intermediate_size=64, num_queries=4, dropout=0.0))
    return APT(encoder, aligner, llm, tok)


def test_interleaving_and_labels(parts):
    _, tok, _, _, (a, b, long) = parts
    apt = make_apt(parts)
    feats, bad = apt.encode_clips([a, b, long])
    assert not bad and feats[long].shape[0] == 3  # three windows
    one = [("audio", a), ("audio", b), ("text", "How many times?")]
    swapped = [("audio", b), ("audio", a), ("text", "How many times?")]
    x1, m1, lab1 = apt.embed_batch([one], feats, ["3"])
    x2, _, _ = apt.embed_batch([swapped], feats, ["3"])
    Q = 4
    answer = tok.encode("3", bos=False) + [tok.eos_id]
    assert x1.shape[1] == 1 + 2 * (1 + Q) + len(tok.encode("How many times?", bos=False)) + len(answer)
    assert not torch.allclose(x1, x2)
    assert torch.equal(x1[0, 1], apt.audio_token) and torch.equal(x1[0, 1 + 1 + Q], apt.audio_token)
    assert lab1[0][lab1[0] != -100].tolist() == answer  # exactly the answer tokens and EOS
    assert (lab1[0, :-len(answer)] == -100).all()
    # a long clip contributes all its windows, in order: 1 + 3 * Q positions
    x3, _, _ = apt.embed_batch([[("audio", long), ("text", "How many times?")]], feats)
    assert x3.shape[1] == 1 + 1 + 3 * Q + len(tok.encode("How many times?", bos=False))
    # right padding for training, left for generation
    batch = [one, [("audio", a), ("text", "Summarize the audio with key words.")]]
    _, m, _ = apt.embed_batch(batch, feats, ["3", "bell, siren"])
    _, ml, _ = apt.embed_batch(batch, feats, left_pad=True)
    assert m[:, 0].all() and ml[:, -1].all()


def test_a_clip_of_several_windows_is_aligned_window_by_window(parts):
    _, tok, _, _, (_, _, long) = parts
    apt = make_apt(parts).eval()
    feats, _ = apt.encode_clips([long])
    question = "How many times?"
    with torch.no_grad():
        prompts = apt.clip_prompts([[("audio", long), ("text", question)]], feats)[0][0]  # (3 * Q, D)
        ids = torch.tensor([tok.encode(question, bos=False)])
        for w in range(3):  # each window alone, under the same instruction, in time order
            alone = apt.proj(apt.aligner.instruct(feats[long][w:w + 1].float(), ids))[0]
            assert torch.allclose(prompts[w * 4:(w + 1) * 4], alone, atol=1e-5)
        flipped = {long: feats[long].flip(0)}
        swapped = apt.clip_prompts([[("audio", long), ("text", question)]], flipped)[0][0]
        assert torch.allclose(swapped[:4], prompts[8:], atol=1e-5)


def test_only_trainable_tensors_learn(parts):
    _, _, encoder, llm, (a, b, _) = parts
    apt = make_apt(parts)
    frozen = {k: v.clone() for k, v in [*encoder.state_dict().items(), *llm.state_dict().items()]}
    feats, _ = apt.encode_clips([a, b])
    batch = [[("audio", a), ("text", "How many times?")], [("audio", b), ("text", "How many times?")]]
    opt = torch.optim.AdamW([p for p in apt.parameters() if p.requires_grad], lr=1e-2)
    loss, n = apt(batch, ["3", "bell, siren"], feats)
    (loss / n).backward()
    assert all(p.grad is None for p in [*encoder.parameters(), *llm.parameters()])
    trainable = {k for k, p in apt.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith(("aligner.", "proj.", "audio_token")) for k in trainable)
    assert apt.audio_token.grad.abs().sum() > 0 and apt.aligner.query_tokens.grad.abs().sum() > 0
    opt.step()
    after = {k: v for k, v in [*encoder.state_dict().items(), *llm.state_dict().items()]}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not apt.encoder.training and not apt.llm.training and apt.train().aligner.training


def test_bf16_autocast_on_cpu(parts):
    _, tok, _, _, (a, b, _) = parts
    apt = make_apt(parts)
    feats, _ = apt.encode_clips([a])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = apt([[("audio", a), ("text", "How many times?")]], ["3"], feats)
    assert torch.isfinite(loss) and n == len(tok.encode("3", bos=False)) + 1
    loss.backward()
    assert torch.isfinite(apt.proj.weight.grad).all()


def test_loss_falls_when_overfitting(parts):
    _, _, _, _, (a, b, _) = parts
    apt = make_apt(parts)
    feats, _ = apt.encode_clips([a, b])
    batch = [[("audio", a), ("text", "How many times?")], [("audio", b), ("text", "How many times?")]]
    opt = torch.optim.AdamW([p for p in apt.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss, n = apt(batch, ["3", "bell, siren"], feats)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        losses.append(loss.item() / n)
    assert losses[-1] < 0.3 * losses[0]
    apt.eval()
    assert apt.generate(batch, feats, max_new_tokens=12) == ["3", "bell, siren"]  # the audio decides the answer


def test_save_load_and_mismatch(parts, tmp_path):
    _, tok, encoder, llm, (a, _, _) = parts
    apt = make_apt(parts, seed=3)
    ids = ({"fingerprint": "enc-1"}, {"fingerprint": "llm-1"})
    apt.save(tmp_path / "apt", *ids)
    again = APT.load(tmp_path / "apt", encoder, llm, tok, *ids)
    assert all(torch.equal(v, again.trainable_state()[k]) for k, v in apt.trainable_state().items())
    with pytest.raises(CheckpointError, match="trained against the llm .*llm-1.*the llm given is .*llm-2"):
        APT.load(tmp_path / "apt", encoder, llm, tok, ids[0], {"fingerprint": "llm-2"})
    with pytest.raises(CheckpointError, match="not a trained APT"):
        APT.load(tmp_path, encoder, llm, tok, *ids)


def test_generate_batch_equals_one_by_one(parts):
    _, _, _, _, (a, b, long) = parts
    apt = make_apt(parts).eval()
    batch = [[("audio", a), ("text", "How many times?")], [("audio", long), ("audio", b), ("text", "Summarize")]]
    together = apt.generate(batch, max_new_tokens=5)
    assert together == [apt.generate([ex], max_new_tokens=5)[0] for ex in batch]


def test_choice_logprob_equals_scoring_each_candidate_in_its_own_row(parts):
    _, _, _, _, (a, b, long) = parts
    apt = make_apt(parts).eval()
    segments = [("audio", a), ("text", "This is a sound of bell."), ("audio", b), ("text", "This is a sound of")]
    answers = ["bell.", "a siren that wails.", "hum", "knock knock knock."]  # different lengths: padding matters
    feats, _ = apt.encode_clips([a, b])
    shared = apt.choice_logprob(segments, answers, feats)
    with torch.no_grad():  # the reference: each candidate in its own row of one padded training batch, no cache
        logits, targets, rows = apt._answer_logits([segments] * len(answers), answers, feats)
        lp = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        lp = lp.masked_fill(targets == apt.tokenizer.eos_id, 0.0)
        separate = torch.zeros(len(answers)).index_add_(0, rows, lp)
    assert shared.shape == (4,) and torch.isfinite(shared).all()
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5)
    assert len(set(shared.tolist())) == 4  # the candidates were really scored apart
