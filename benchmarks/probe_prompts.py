"""Where a clip's sounds get lost on the way to the LLM: how well a linear read-out tells which of the classes a clip
holds at each step of APT's path, beside how well the frozen LLM itself tells it.

A multi-label logistic regression (its L2 weight chosen on a fifth of the training clips held out) is fitted on the
tagging training split and scored by macro mAP on the test split, reading

    filter banks   the log-mel spectrogram the encoder sees, its mean and maximum over time
    encoder        the frozen encoder's features (the block APT reads), their mean and maximum over patches
    soft prompts   the APT's acoustic prompts as the LLM receives them: the projected queries, concatenated
    the LLM        no read-out: each class name's likelihood as the whole answer to the clip's tagging prompt
                   ("Summarize the audio with key words."), and evaluate.py's likelihood protocol ("This is a
                   sound of {class}." after the clip, the few-shot query's form, which stage 2 also trains with
                   made-up names)

A read-out well above chance at the soft prompts and the LLM near chance says the sounds reach the LLM's input and
the LLM does not use them: the last step (projection and LLM) is where training has to work, not the encoder or the
aligner. A read-out is an upper bound of a kind the LLM need not reach (it is trained on these labels directly).

    python benchmarks/probe_prompts.py [--preset small] [--checkpoint DIR] [--train 1000] [--test 200]
                                       [--key=value ...]        (2-3 min for small on 2 cores)
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from apt_min import audio, data, metrics, tasks
from apt_min.build import load_apt
from apt_min.config import load_config
from apt_min.errors import clean_exit
from apt_min.evaluation import audioset_classes, likelihood_scores
from apt_min.release import resolve_checkpoint


def with_bias(x: torch.Tensor) -> torch.Tensor:
    """x (N, F) with a column of ones appended: the read-out's last weight row is its bias."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def fit_readout(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> torch.Tensor:
    """Weights (F + 1, C) of a multi-label logistic regression on standardised x (N, F) with 0/1 labels y (N, C):
    mean binary cross-entropy plus l2 times the squared weights (not the bias), minimised by L-BFGS."""
    w = torch.zeros(x.shape[1] + 1, y.shape[1], dtype=torch.float64, requires_grad=True)
    xb = with_bias(x)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return w.detach()


def readout_map(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> tuple[float, float]:
    """Test mAP of the read-out, with its L2 weight chosen on the last fifth of the training rows; (mAP, l2)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x = torch.from_numpy((train - mean) / std).double()
    xt = torch.from_numpy((test - mean) / std).double()
    y = torch.from_numpy(y_train).double()
    cut = len(x) * 4 // 5

    def held_out(l2):
        return metrics.mean_average_precision((with_bias(x[cut:]) @ fit_readout(x[:cut], y[:cut], l2)).numpy(),
                                              y_train[cut:])

    l2 = max((1e-5, 1e-4, 1e-3, 1e-2, 1e-1), key=held_out)
    return metrics.mean_average_precision((with_bias(xt) @ fit_readout(x, y, l2)).numpy(), y_test), l2


@torch.no_grad()
def tagging_prompt_scores(apt, examples, classes: list[str]) -> np.ndarray:
    """(examples, classes): each class name's log-likelihood as the whole answer after the example's own clip and
    tagging prompt (EOS not counted): which sounds the LLM says a clip holds when asked as in training."""
    feats, _ = apt.encode_clips([ex.segments[0][1] for ex in examples], strict=True)
    names = [tasks.label_text(c) for c in classes]
    return np.stack([apt.choice_logprob(ex.segments, names, feats).float().cpu().numpy() for ex in examples])


@torch.no_grad()
def representations(apt, examples, batch: int = 32) -> dict[str, np.ndarray]:
    """Each example's clip at the three steps: filter banks, encoder features, soft prompts (one row each)."""
    enc = apt.encoder.config
    rows = {"filter banks": [], "encoder": [], "soft prompts": []}
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        paths = [ex.segments[0][1] for ex in chunk]
        feats, _ = apt.encode_clips(paths, strict=True)
        prompts = apt.clip_prompts([ex.segments for ex in chunk], feats)
        for path, p in zip(paths, prompts):
            bank = audio.load_fbank(path, enc.target_length, enc.num_mel_bins).flatten(0, 1)  # (W * T, F)
            f = feats[path].float().flatten(0, 1)  # (W * N, Da)
            rows["filter banks"].append(torch.cat([bank.mean(0), bank.amax(0)]))
            rows["encoder"].append(torch.cat([f.mean(0), f.amax(0)]))
            rows["soft prompts"].append(p[0].float().flatten())  # the clip's (W * Q, D) prompts, in order
    return {k: torch.stack(v).numpy().astype(np.float64) for k, v in rows.items()}


@clean_exit("probe_prompts.py")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", default=None, help="an APT folder (default: the run's own, else the release)")
    ap.add_argument("--train", type=int, default=1000, help="training clips the read-outs learn from")
    ap.add_argument("--test", type=int, default=200, help="test clips they (and the LLM) are scored on")
    args, rest = ap.parse_known_args()
    cfg = load_config(args.preset, rest)
    checkpoint = resolve_checkpoint(cfg, args.checkpoint)
    apt = load_apt(cfg, checkpoint)
    classes = audioset_classes(cfg)
    train = data.examples("tagging", cfg.data_root, "train")[:args.train]
    test = data.examples("tagging", cfg.data_root, "test")[:args.test]
    y_train, y_test = metrics.label_matrix(train, classes), metrics.label_matrix(test, classes)
    chance = metrics.mean_average_precision(np.random.default_rng(0).random(y_test.shape), y_test)
    r_train, r_test = representations(apt, train), representations(apt, test)
    print(f"{args.preset}, {checkpoint}: which of {len(classes)} classes a clip holds, macro mAP on {len(test)} test "
          f"clips (random scores: {chance:.3f}); read-outs fitted on {len(train)} training clips")
    for step in r_train:
        score, l2 = readout_map(r_train[step], y_train, r_test[step], y_test)
        print(f"  {step:<13} linear read-out {score:.3f}   ({r_train[step].shape[1]} numbers a clip, L2 {l2:g})")
    asked = metrics.mean_average_precision(tagging_prompt_scores(apt, test, classes), y_test)
    print(f"  {'the LLM':<13} its likelihoods {asked:.3f}   (each name as the answer to the tagging prompt)")
    llm = metrics.mean_average_precision(likelihood_scores(apt, test, classes), y_test)
    print(f"  {'':<13} its likelihoods {llm:.3f}   (evaluate.py --task audioset's: \"This is a sound of {{class}}.\")")


if __name__ == "__main__":
    main()
