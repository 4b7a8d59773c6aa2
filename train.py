"""Train APT (paper §3.3: stage 0 aligns the aligner with audio-text losses, stages 1-2 tune it against the frozen LLM).

PLACEHOLDER until the training issue (#6) lands: the stages 0, 1 and 2 are not written yet. What runs today is the
part that exists — the decoder. `python train.py` trains a tokenizer and a tiny Llama on a few embedded sentences
(the tiny preset's stand-in for Vicuna will be trained the same way on the synthetic benchmark's text), saves them in
Hugging Face's layout under weights/tiny-llm/, loads them back through the same path Vicuna takes, and generates.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from apt_min.llama import Llama, LlamaConfig
from apt_min.tokenizer import Tokenizer, train_sentencepiece

SENTENCES = [
    "A dog barks twice while a car passes by.", "Rain falls on a tin roof and thunder rumbles far away.",
    "A siren wails, then fades into traffic noise.", "Birds chirp in the morning as a stream flows.",
    "A bell rings three times in a quiet hall.", "A man speaks and a crowd laughs.",
    "An engine idles and then accelerates.", "Water drips into a sink at a steady pace.",
    "A door creaks open and slams shut.", "Footsteps echo in an empty corridor.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, choices=[0, 1, 2], help="APT training stage (arrives with issue #6)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="weights/tiny-llm")
    args = ap.parse_args()
    if args.stage is not None:
        raise SystemExit(f"train.py --stage {args.stage}: APT training stages are not implemented yet (issue #6). "
                         "Run `python train.py` without --stage for the decoder demonstration.")
    torch.manual_seed(0)
    out = Path(args.out)
    train_sentencepiece(SENTENCES * 20, out / "tokenizer.model", vocab_size=400)
    tok = Tokenizer(out)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Llama(cfg)
    ids, mask = tok.pad([tok.encode(s, eos=True) for s in SENTENCES], side="right")  # (N, T)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # next token; no loss on padding
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps + 1):
        logits = model(ids[:, :-1], attention_mask=mask[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    print(f"saved {out}/ (config.json, model.safetensors, tokenizer.model)")

    model = Llama.from_pretrained(out)  # the path a Vicuna folder takes
    prompts = ["A dog", "Rain falls", "A bell"]
    ids, mask = tok.pad([tok.encode(p) for p in prompts], side="left")
    for name, kw in (("greedy", {}), ("beam 3", {"num_beams": 3})):
        new = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=tok.eos_id, **kw)
        for p, row in zip(prompts, new):
            print(f"{name:>7}: {p} -> {tok.decode(row)!r}")


if __name__ == "__main__":
    main()
