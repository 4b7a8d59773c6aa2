import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


# ------------------------------------------------------------------- a miniature of the tiny preset's chain
MINI = ["--synth_scale=0.1", "--batch_size=4", "--llm_vocab=400", "--llm_hidden=32", "--llm_layers=2",
        "--llm_heads=2", "--llm_kv_heads=1", "--llm_intermediate=64", "--aligner_hidden=32", "--aligner_layers=2",
        "--aligner_heads=2", "--aligner_intermediate=64", "--num_queries=4", "--encoder_dim=32", "--encoder_depth=2",
        "--encoder_heads=2", "--steps_0=3", "--steps_lm=3", "--steps_1=4", "--steps_2=2", "--eval_every=1000",
        "--log_every=1", "--save_every=2", "--warmup_steps=2", "--val_batches=1"]


def opts(tmp: Path, *extra):
    return [f"--data_root={tmp / 'synth'}", f"--run_dir={tmp / 'run'}", *MINI, *extra]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Synthetic data, stage 0 and the stand-in LLM: what stages 1 and 2 start from."""
    tmp = tmp_path_factory.mktemp("chain")
    import train

    train.main(["--stage", "0", *opts(tmp)])
    train.main(["--stage", "lm", *opts(tmp)])
    return tmp


def copy_of(prepared, tmp_path):
    shutil.copytree(prepared / "run", tmp_path / "run")
    (tmp_path / "synth").symlink_to(prepared / "synth")
    return tmp_path
