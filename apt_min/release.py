"""A trained APT as a small folder that is committed to the repository, so that a user can evaluate and ask right
after fetching the LLM, without training:

    python -m apt_min.release runs/small-more3 weights/apt-small   (how the committed release was made: README)

writes, in bfloat16:

    apt.safetensors      the aligner without its stage-0 heads (answering never uses them), the projection, <AUDIO>
    encoder.safetensors  the encoder the run read (its --stage mae result, or a .pth such as Audio-MAE's, read with
                         the run's settings), cut after the block APT reads: the blocks after it are never run
                         (AudioMAE.forward), so the features are the same
    apt.json             the run's apt.json, the encoder's identity now that of encoder.safetensors, and made_by:
                         the APT's making, stage by stage (`history`)
    SHA256SUMS           each file's checksum, as `sha256sum -c` reads it

`resolve_checkpoint` is how evaluate.py, `ask` and the stages that start from a trained APT (train.py: --start_from,
caption_ft, vision) find what to load: the given folder, else the user's own run ({run_dir}/stage2/final), else the
preset's release (Config.release), whose checksums are verified first; the encoder and the LLM are then the ones that
APT was trained against (`take_its_parts`).
Without the stage-0 heads the release cannot run the paper's tagging protocol (its text branch); evaluate.py says so
and scores tagging by the LLM's likelihood.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path

import torch

from apt_min.aligner import STAGE0_HEADS
from apt_min.audiomae import AudioMAE
from apt_min.checkpoint import CheckpointError
from apt_min.config import STARTS_AFTER, Config, load_config, stage_folder
from apt_min.errors import clean_exit
from apt_min.model import APT, encoder_identity, fingerprint
from apt_min.weights import sha256

log = logging.getLogger(__name__)
FILES = ("apt.safetensors", "encoder.safetensors", "apt.json")


def pack(run_dir: str | Path, out: str | Path) -> dict[str, str]:
    """Write the release of the APT in run_dir/stage2/final (and the encoder it names) into `out`; returns
    {file: sha256}."""
    from safetensors.torch import load_file, save_file

    final, out = Path(run_dir) / stage_folder("2") / "final", Path(out)
    if not (final / "apt.json").is_file():
        raise CheckpointError(f"{final}: no trained APT to release (apt.json missing)")
    meta = APT.read_meta(final)  # what loading the release will need
    if "path" not in meta["encoder"]:
        raise CheckpointError(f"{final / 'apt.json'}: names no encoder path to cut the release's encoder from")
    encoder = AudioMAE.from_checkpoint(meta["encoder"]["path"], encoder_settings(final, meta))
    if (now := encoder_identity(meta["encoder"]["path"], encoder.config)) != meta["encoder"].get("fingerprint"):
        raise CheckpointError(f"{meta['encoder']['path']}: not the encoder {final} was trained against (its "
                              f"fingerprint is {now}, {final / 'apt.json'} records {meta['encoder'].get('fingerprint')}"
                              "): was it pretrained again or replaced since? Nothing released")
    out.mkdir(parents=True, exist_ok=True)
    heads = tuple(f"aligner.{h}" for h in STAGE0_HEADS)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(final / "apt.safetensors").items()
             if not k.startswith(heads)}
    save_file(state, str(out / "apt.safetensors"))

    used = encoder.config.output_block % encoder.config.depth + 1  # blocks up to the one APT reads
    cut = AudioMAE(dataclasses.replace(encoder.config, depth=used, output_block=-1))
    cut.load_state_dict({k: v for k, v in encoder.state_dict().items()
                         if not k.startswith("blocks.") or int(k.split(".")[1]) < used})
    cut.to(torch.bfloat16).save(out / "encoder.safetensors")
    meta["encoder"] = {"path": str(out / "encoder.safetensors"),
                       "fingerprint": fingerprint(out / "encoder.safetensors"), "cut_from": meta["encoder"]}
    meta["stage0_heads"] = False
    meta["made_by"] = history(final)
    (out / "apt.json").write_text(json.dumps(meta, indent=1))
    sums = {name: sha256(out / name) for name in FILES}
    (out / "SHA256SUMS").write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def history(final: str | Path) -> list[dict]:
    """How the APT in `final` was made, stage by stage from the first: each stage's run folder, steps, task mixture
    and start, followed back from `final` through each run's --start_from and, without it, the previous stage's
    result in the same run folder (stage 0 writes its aligner alone, without the run's settings)."""
    made, final, seen = [], Path(final), set()
    while final not in seen:
        seen.add(final)
        if (final / "aligner.json").is_file() and not (final / "apt.json").is_file():
            made.append({"stage": "0", "run_dir": str(final.parent.parent)})
            break
        if not (final / "apt.json").is_file():
            break
        meta = APT.read_meta(final, needs=())
        cfg, stage = meta.get("config", {}), str(meta.get("stage"))
        made.append({"stage": stage, "run_dir": cfg.get("run_dir"), "steps": cfg.get(f"steps_{stage}"),
                     "task_ratios": cfg.get("task_ratios") or None, "start_from": cfg.get("start_from") or None})
        if cfg.get("start_from"):
            final = Path(cfg["start_from"])
        elif stage in STARTS_AFTER and cfg.get("run_dir"):
            final = Path(cfg["run_dir"]) / stage_folder(STARTS_AFTER[stage], cfg.get("caption_ft_source", "")) / "final"
    return made[::-1]


def encoder_settings(final: Path, meta: dict):
    """How the run read its encoder: None for a .safetensors file (its config travels inside), else the run's
    settings (a .pth holds weights only: the block read and the window length are the run's)."""
    if Path(meta["encoder"]["path"]).suffix == ".safetensors":
        return None
    if "config" not in meta:
        raise CheckpointError(f"{final}/apt.json: no 'config' to say how the run read its encoder "
                              f"{meta['encoder']['path']}")
    known = {f.name for f in dataclasses.fields(Config)}
    return load_config(meta["config"].get("preset", "tiny"),
                       {k: v for k, v in meta["config"].items() if k in known}).encoder_config()


def verify(folder: str | Path):
    """Every file of a release against its SHA256SUMS line (as `sha256sum` writes them: "<hash>  <name>", or
    "<hash> *<name>"; blank lines skipped), each of FILES listed; raises CheckpointError naming what differs."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise CheckpointError(f"{folder}: not a release (SHA256SUMS missing)")
    listed = {}
    for number, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        want, _, name = line.strip().partition(" ")
        name = name.lstrip(" ").removeprefix("*")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", want) or not name:
            raise CheckpointError(f"{sums}:{number}: expected '<sha256>  <file name>', found {line!r}")
        if name in listed:
            raise CheckpointError(f"{sums}:{number}: {name} is listed twice")
        listed[name] = want.lower()
    if unlisted := [name for name in FILES if name not in listed]:
        raise CheckpointError(f"{sums}: lists no checksum for {', '.join(unlisted)}")
    for name, want in listed.items():
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing from the release")
        if sha256(folder / name) != want:
            raise CheckpointError(f"{folder / name}: checksum differs from SHA256SUMS (a changed or damaged file)")


def resolve_checkpoint(cfg, given: str | None) -> Path:
    """The APT to load: `given`, else the user's own {run_dir}/stage2/final, else the preset's verified release. A
    release (a folder with SHA256SUMS, given or the preset's) is verified first and supplies the encoder too (the
    encoder its APT was trained against, cut after the block it reads): cfg.encoder_checkpoint is set to it; for any
    other, the encoder and the LLM its apt.json names where the settings name none (take_its_parts). Raises
    SystemExit when the release fails its check."""
    if given:
        folder = Path(given)
        return take_its_parts(cfg, use_release(cfg, folder) if (folder / "SHA256SUMS").is_file() else folder)
    own = cfg.stage_dir("2") / "final"
    if (own / "apt.json").is_file() or not cfg.release or not Path(cfg.release).is_dir():
        return take_its_parts(cfg, own)
    return take_its_parts(cfg, use_release(cfg, Path(cfg.release)))  # verified: a missing file is named


def use_release(cfg, release: Path) -> Path:
    try:
        verify(release)
    except CheckpointError as e:
        raise SystemExit(f"the released APT cannot be used: {e}") from None
    ships = str(release / "encoder.safetensors")
    if cfg.encoder_checkpoint and Path(cfg.encoder_checkpoint).resolve() != Path(ships).resolve():
        log.warning("%s brings the encoder its APT was trained against; --encoder_checkpoint=%s is not used", release,
                    cfg.encoder_checkpoint)
    cfg.encoder_checkpoint = ships
    return release


def take_its_parts(cfg, checkpoint: Path) -> Path:
    """An APT answers only beside the encoder and the LLM it was trained against: its apt.json names both (and
    APT.load checks their fingerprints). Where the settings leave them to the run folder (no --encoder_checkpoint,
    no --llm_path: {run_dir}/encoder.safetensors and {run_dir}/llm), a checkpoint from another run folder (a
    continuation, --checkpoint, --start_from) would find other ones there, or none: the ones its apt.json names are
    used instead, where they are. Settings that name them are kept (APT.load then says if they differ)."""
    if not (checkpoint / "apt.json").is_file():
        return checkpoint
    meta = APT.read_meta(checkpoint, needs=())
    encoder, llm = meta.get("encoder", {}).get("path"), meta.get("llm", {}).get("path")
    runs_encoder, runs_llm = Path(cfg.run_dir) / "encoder.safetensors", Path(cfg.resolved_llm_path())
    if not cfg.encoder_checkpoint and encoder and Path(encoder).is_file() and \
            Path(encoder).resolve() != runs_encoder.resolve():
        log.info("%s was trained against the encoder %s, which is used (not %s)", checkpoint, encoder, runs_encoder)
        cfg.encoder_checkpoint = encoder
    if not cfg.llm_path and llm and Path(llm, "config.json").is_file() and Path(llm).resolve() != runs_llm.resolve():
        log.info("%s was trained against the LLM in %s, which is used (not %s)", checkpoint, llm, runs_llm)
        cfg.llm_path = llm
    return checkpoint


@clean_exit("python -m apt_min.release")
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished run (its stage2/final and the encoder it names)")
    ap.add_argument("out", help="the release folder to write")
    args = ap.parse_args(argv)
    sums = pack(args.run_dir, args.out)
    for name, h in sums.items():
        size = (Path(args.out) / name).stat().st_size
        print(f"{h}  {name}  ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
