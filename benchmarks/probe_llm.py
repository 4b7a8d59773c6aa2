"""Why APT-tiny fails at few-shot classification of novel classes and at counting: probes of the trained stand-in
LLM on text alone, where the scene is written out (as in its pretraining documents) instead of heard, so that no
shortcoming of the audio side can be the cause.

(1) Copy drills: a line of made-up words, then generation: is the line said again? Answering "This is a sound of"
    with a novel class's name needs this copying (the name appears only in the text after the support clips).
    Vicuna does it; a small Llama pretrained on the benchmark's text may not.
(2) The few-shot documents of the stand-in's own pretraining corpus (test split; clips described with code words,
    so the label must be found by matching the query's description to a support's): answered with the class names
    they were trained with, and with every class renamed to a made-up word (the situation of novel classes).
(3) The counting documents of the same corpus: the count is in the description; accuracy beside always answering
    the most frequent count.
(4) --toy STEPS: a fresh Llama of the stand-in's size trained on copy drills alone (batch --batch, one line said
    twice per document): the copy-token accuracy every 125 steps (and at the last) shows when copying is learned.
    python benchmarks/probe_llm.py [--run_dir runs/tiny] [--data_root data/synth] [--split test] [--toy 1000 --batch 64]
(--split train: the documents it was trained on. A split without few-shot or counting documents says so on its line.)
"""

import argparse
import random
import re
import time
from collections import Counter

import torch
import torch.nn.functional as F

from apt_min import data, synth, tasks
from apt_min.errors import clean_exit, whole_number
from apt_min.llama import Llama
from apt_min.tokenizer import Tokenizer


def line(rng):
    return " ".join(data.pseudo_word(rng) for _ in range(rng.randint(2, 6))) + "."


def answer(llm, tok, pieces, n=30):
    ids = [tok.bos_id] + [i for p in pieces for i in tok.encode(p, bos=False)]
    return tok.decode(llm.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=tok.eos_id)[0]).strip()


def label_of(support_text):
    """"This is a sound of bell." -> "bell"."""
    return support_text[len(tasks.FEWSHOT_QUERY) + 1:-1]


def renamed_document(doc: list[str], rng: random.Random) -> tuple[list[str], str]:
    """A few-shot document (support description, "This is a sound of {label}.", ..., the query's description, the
    query's prompt, its label) as (its prompt with a made-up word for each class, the query class's word): the
    descriptions are kept, so only matching the query's to a support's can find the answer."""
    names, supports = {}, range(1, len(doc) - 3, 2)
    for i in supports:
        names.setdefault(label_of(doc[i]), data.pseudo_word(rng))
    text = [tasks.PROMPTS["fewshot"][0].format(label=names[label_of(p)]) if i in supports else p
            for i, p in enumerate(doc[:-1])]
    return text, names.get(doc[-1])


def probe(run_dir, data_root, split="test"):
    tok, llm = Tokenizer(f"{run_dir}/llm"), Llama.from_pretrained(f"{run_dir}/llm").eval()
    rng = random.Random(0)
    lines = [line(rng) for _ in range(50)]
    said = [answer(llm, tok, [x]) for x in lines]
    print(f"(1) copy drills: {sum(s.startswith(x) for s, x in zip(said, lines)) / len(lines):.0%} of 50 lines said "
          f"again; e.g. {lines[0]!r} -> {said[0]!r}")
    corpus = synth.lm_corpus(data_root, split, 0)
    docs = [d for d in corpus if d[-2] == tasks.FEWSHOT_QUERY]
    counting = [d for d in corpus if re.fullmatch(r"How many times does \w+ occur\?", d[1])]  # not AQA's "the X"
    real = renamed = 0
    for doc in docs:
        real += re.split(r"[.;\s]", answer(llm, tok, doc[:-1], 8))[0] == doc[-1]
        text, name = renamed_document(doc, rng)
        renamed += re.split(r"[.;\s]", answer(llm, tok, text, 8))[0] == name
    print(f"(2) {len(docs)} few-shot documents (text): answered with the trained names {real / len(docs):.0%}, "
          f"with made-up names {renamed / len(docs):.0%}" if docs else f"(2) few-shot documents: none in {split}")
    if not counting:
        print(f"(3) counting documents: none in {split}")
        return tok, llm.config
    hits = sum(tasks.parse_count(answer(llm, tok, d[:-1], 4)) == int(d[-1]) for d in counting)
    majority = Counter(d[-1] for d in counting).most_common(1)[0]
    print(f"(3) {len(counting)} counting documents (text): accuracy {hits / len(counting):.0%}; always "
          f"{majority[0]!r}: {majority[1] / len(counting):.0%}")
    return tok, llm.config


def toy(tok, config, steps, batch):
    torch.manual_seed(0)
    llm = Llama(config)  # the probed stand-in's shape, fresh weights
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-3, weight_decay=0.05)
    rng, t = random.Random(1), time.time()
    for step in range(1, steps + 1):
        pieces = [tok.encode(line(rng), bos=False) for _ in range(batch)]
        ids, mask = tok.pad([[tok.bos_id] + p + p + [tok.eos_id] for p in pieces])
        second = torch.zeros_like(mask, dtype=torch.bool)  # targets of the second saying (shifted by one)
        for i, p in enumerate(pieces):
            second[i, len(p) + 1:2 * len(p) + 1] = True
        logits = llm(ids[:, :-1], attention_mask=mask[:, :-1])
        at = mask[:, 1:].bool()
        F.cross_entropy(logits[at].float(), ids[:, 1:][at]).backward()
        opt.step()
        opt.zero_grad()
        if step % 125 == 0 or step == steps:
            with torch.no_grad():
                acc = (logits.argmax(-1) == ids[:, 1:])[second[:, 1:]].float().mean().item()
            print(f"(4) toy step {step}: copy-token accuracy {acc:.2f} ({time.time() - t:.0f} s)", flush=True)


@clean_exit("probe_llm.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", default="runs/tiny")
    ap.add_argument("--data_root", default="data/synth")
    ap.add_argument("--split", default="test", choices=("test", "train"), help="the corpus documents of (2), (3)")
    ap.add_argument("--toy", type=whole_number(0), default=0, help="steps of the drill-only toy (0: skip)")
    ap.add_argument("--batch", type=whole_number(1), default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, config = probe(args.run_dir, args.data_root, args.split)
    if args.toy:
        toy(tok, config, args.toy, args.batch)


if __name__ == "__main__":
    main()
