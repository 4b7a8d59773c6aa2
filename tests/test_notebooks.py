"""The notebooks: each runs from top to bottom against the miniature chain's trained APT (APT_MIN_RUN_DIR points a
notebook's parameter cell at it, so nothing depends on what runs/ holds) and prints the values its prose explains; the
committed copies carry the outputs of a full run, with no error and no cell left unrun."""

from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
PRINTED = {  # what each notebook must print (sizes that do not depend on the miniature's own sizes)
    "00_overview.ipynb": ["fbank windows: (1, 512, 128)", "Summarize the audio with key words. -> "],
    "01_audio_to_features.ipynb": ["loaded: (192000,) = 12.00 s at 16 kHz", "frames x mel bins: (1198, 128)   "
                                   "expected frames: 1198", "fbank windows: (3, 512, 128)",
                                   "patch grid (time x frequency): (32, 8) = 256 tokens", "tokens: (3, 256, "],
    "02_aligner_and_stage0.ipynb": ["cross-attention in layers [0]", "masks: (9, 9)", "audio features: (",
                                    " trained: ATC ", "retrieval R@1 on these clips: a2t_r1 "],
    "03_llm_and_acoustic_prompts.ipynb": ["files: ['config.json', 'model.safetensors', 'tokenizer.model', "
                                          "'tokenizer_settings.json']",
                                          "without the cache, the same tokens: True", "labelled positions: ",
                                          "= BOS + 2 x (<AUDIO> + ", "positions = template (",
                                          "before the segments: '<|im_start|>system"],
    "04_tagging.ipynb": ["mAP, paper protocol (text branch): ",
                         "AP of one class by hand equals metrics.average_precision: True"],
    "05_captioning.ipynb": ["BLEU by hand equals metrics.bleu: True", "SPICE: ",
                            "baseline caption (the most frequent training caption): ", "\n  small: ",
                            "tiny   small  baseline"],
    "06_question_answering.ipynb": ["three annotators ['Two.', '2', 'three'] -> trained answer 'two' | scored against "
                                    "'2'", "accuracy, yes/no questions", "rows: truth yes, no; columns: said yes"],
    "07_detection_and_retrieval.ipynb": ["metrics.segment_f1 (matched, predicted, true): ",
                                         "detection segment F1: APT ", "retrieval accuracy: APT "],
    "08_counting.ipynb": ["'twice'                -> 2", "mean absolute error  APT ", "true counts: "],
    "09_fewshot.ipynb": [" positions = BOS + 5 x (<AUDIO> + ", "training classes, made-up names ",
                         "ranked answer changed in ", "small gen", "vs a prototypical network"],
    "10_nlar.ipynb": ["accuracy vs always 'yes': APT ", "the answer flipped with the clips in ",
                      "accuracy: original order ", "APT-small accuracy: original order "],
    "11_training_stages.ipynb": ["steps logged once each after resuming: True", "stage 0 trains ",
                                 "resumed run's per-step losses equal the uninterrupted run's: True"],
    "12_paper_scale.ipynb": ["encoder tokens             (2, 512, 768)", "logits                     (2, 53, 32000)",
                             "long_audio=all: a 2-window clip's tokens (1, 1024, 768) -> aligner queries (1, 32, 256)",
                             "trained in stages 1-2: 15.7 M parameters"],
    "13_audio_visual.ipynb": ["24 looks: bell = red circle, siren = green circle", "the same LLM object in both: True",
                              "audio-visual  positions = ", "visual + <AUDIO> + ", "audio-visual, cloze likelihood",
                              "audio after another video   pictured 0.",
                              "EVA ViT-g/14 on the meta device: 39 blocks, 1408-d, 256 + 1 tokens per frame"],
}


SMALL_BESIDE_TINY = ("03_llm_and_acoustic_prompts.ipynb", "05_captioning.ipynb", "09_fewshot.ipynb", "10_nlar.ipynb")


def printed(nb) -> str:
    return "".join("".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_every_notebook_is_listed():
    assert [p.name for p in NOTEBOOKS] == sorted(PRINTED)
    listing = (FOLDER / "README.md").read_text()
    assert all(name in listing for name in PRINTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_complete(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a cell was never run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert all(line in printed(nb) for line in PRINTED[path.name])
    assert path.stat().st_size < 300_000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, trained, monkeypatch, request):
    import nbformat  # from jupyter, in requirements.txt
    from nbclient import NotebookClient

    run = request.getfixturevalue("with_vision") if path.name == "13_audio_visual.ipynb" else trained
    monkeypatch.setenv("APT_MIN_RUN_DIR", str(run / "run"))
    monkeypatch.setenv("APT_MIN_DATA_ROOT", str(run / "synth"))
    monkeypatch.setenv("APT_MIN_AVQA_LIMIT", "6")
    if path.name in SMALL_BESIDE_TINY:  # the small preset's miniature run, against SmolLM2
        small_run, _ = request.getfixturevalue("small_run")
        folder, _ = request.getfixturevalue("smollm2")
        monkeypatch.setenv("APT_MIN_SMALL_RUN_DIR", str(small_run))
        monkeypatch.setenv("APT_MIN_SMALL_LLM", str(folder))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    out = printed(nb)
    missing = [line for line in PRINTED[path.name] if line not in out]
    assert not missing, missing
