"""Ask a trained APT about audio:

    python -m apt_min ask --audio a.wav [--audio b.wav ...] "In which recording does the knock occur more often?"

Several clips go into one sequence in the order given, then the question; the answer is printed as it is
generated. --checkpoint as in evaluate.py (by default the one the preset's training chain wrote, else the preset's
release: `--preset small` answers with the committed weights/apt-small/); --preset and any --key=value setting as in
train.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apt_min.checkpoint import CheckpointError
from apt_min.errors import UserError, whole_number


def ask(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apt_min ask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", action="append", required=True, help="an audio file; repeat for several clips")
    ap.add_argument("question")
    ap.add_argument("--checkpoint", help="a trained APT folder (default: {run_dir}/stage2/final, else the preset's "
                    "release)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-new-tokens", type=whole_number(1), default=40)
    args, rest = ap.parse_known_args(argv)
    words = [a for a in rest if not a.startswith("--")]
    if words and not any(a.startswith("--") and "=" not in a for a in rest):  # a question typed without quotes
        # (a bare --key takes its value with "=": load_config says so below)
        ap.error(f"unexpected {' '.join(words)!r} after the question {args.question!r}; give the whole question "
                 "in quotes")
    if not args.question.strip():
        ap.error("the question is empty")
    import torch

    from apt_min import audio
    from apt_min.build import load_apt
    from apt_min.config import load_config
    from apt_min.model import APT
    from apt_min.release import resolve_checkpoint

    for path in args.audio:  # before the model loads (a preset's LLM may first be fetched and converted)
        if not Path(path).is_file():
            print(f"error: {audio.not_a_file(path)}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.preset, rest)
        checkpoint = resolve_checkpoint(cfg, args.checkpoint)
        if not (checkpoint / "apt.json").is_file():
            raise CheckpointError(f"{checkpoint}: no trained APT there (train one with train.py, or pass "
                                  "--checkpoint)")
        APT.read_meta(checkpoint)  # a broken description is said before the model loads
        apt = load_apt(cfg, checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
        feats, bad = apt.encode_clips(args.audio)
    except UserError as e:  # a file or setting the user gave: the message alone, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bad:
        for _, reason in bad:  # each reason names its file
            print(f"error: {reason}", file=sys.stderr)
        return 2
    stream = TextStream(apt.tokenizer.decode, lambda text: print(text, end="", flush=True))
    segments = [("audio", p) for p in args.audio] + [("text", args.question)]
    apt.generate([segments], feats, max_new_tokens=args.max_new_tokens, streamer=lambda token: stream(int(token[0])))
    stream.finish()
    print()
    return 0


class TextStream:
    """Tokens in, text out as soon as it is whole: what each token adds to the decoded text, held back while the
    text ends in an unfinished character (a byte-level tokenizer spells one character over several tokens, which
    decode to U+FFFD until the last one comes); finish() writes whatever is left."""

    def __init__(self, decode, write):
        self.decode, self.write, self.ids, self.shown = decode, write, [], ""

    def __call__(self, token: int):
        self.ids.append(token)
        self._show(self.decode(self.ids).rstrip("\ufffd"))

    def finish(self):
        self._show(self.decode(self.ids))

    def _show(self, text: str):
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "ask":
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return ask(argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
