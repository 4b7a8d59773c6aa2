"""Reading weight files safely: safetensors parsed by hand, torch files only with weights_only=True, every key
checked before any tensor is read. Used by every loader here: the LLM, the encoder, the aligner, an APT, the vision
side and training's checkpoints.

A model folder in Hugging Face's layout holds `model.safetensors`, or shards listed in `model.safetensors.index.json`
(or the older `pytorch_model.bin` / `pytorch_model.bin.index.json`). `checkpoint_tensors` indexes them without reading
data; each entry fills its destination tensor straight from disk.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import struct
from pathlib import Path

import torch

from apt_min.errors import UserError


class CheckpointError(UserError, ValueError):
    """A model folder or weight file that cannot be loaded as asked; the message names the file and the keys."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
READ_CHUNK = 1 << 22  # elements per piece when a tensor must be cast or moved on its way in


def resolve_dtype(dtype, auto: str | None = None) -> torch.dtype:
    """A torch float dtype from a name; "auto" takes `auto` (a config's torch_dtype), float32 where that is None."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        dtype = auto or "float32"
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")


def checkpoint_tensors(path: Path) -> dict[Path, dict]:
    """Index the weight files of a model folder without reading any tensor data.
    Returns {file: {key: reader}}, where reader.shape is the stored shape and reader(dest) fills `dest`."""
    for index_name, single, reader in (("model.safetensors.index.json", "model.safetensors", safetensors_entries),
                                       ("pytorch_model.bin.index.json", "pytorch_model.bin", torch_entries)):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise CheckpointError(f"{index}: not a JSON object") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: no 'weight_map' of key -> file name")
            files = sorted({path / f for f in weight_map.values()})
            if missing := [f.name for f in files if not f.is_file()]:
                raise CheckpointError(f"{index}: lists shard files that are not there: {missing}")
            shards = {f: reader(f) for f in files}
            for key, f in weight_map.items():
                if key not in shards[path / f]:
                    raise CheckpointError(f"{index}: says {key!r} is in {f}, but that file does not hold it")
            return shards
        if (path / single).is_file():
            return {path / single: reader(path / single)}
    raise CheckpointError(f"{path}: no weights found (model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json)")


class _Entry:
    """One stored tensor: its shape, and how to copy it into a destination parameter."""

    def __init__(self, shape, fill):
        self.shape, self.fill = tuple(shape), fill

    def __call__(self, dest: torch.Tensor):
        self.fill(dest)


def safetensors_header(file: Path) -> tuple[dict, dict, int]:
    """Parse a .safetensors header: 8-byte little-endian length, then JSON mapping each name to its dtype, shape
    and byte offsets, plus an optional "__metadata__" of strings. Returns (tensors, metadata, data start)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def safetensors_entries(file: Path) -> dict[str, _Entry]:
    """The tensors of a .safetensors file, each read straight from disk into its parameter: no memory map that
    would count the whole file against the process."""
    header, _, start = safetensors_header(file)
    size = file.stat().st_size
    entries, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{file}: tensor {name!r} has no dtype, shape and offsets: {info!r}")
        file_dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if file_dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed shape {shape!r} or offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty(0, dtype=file_dtype).element_size()
        if end - begin != nbytes or start + end > size:
            raise CheckpointError(f"{file}: tensor {name!r} is truncated or its offsets do not match its shape")
        spans.append((begin, end, name))

        def fill(dest, file_dtype=file_dtype, offset=start + begin):
            with open(file, "rb") as f:
                f.seek(offset)
                if dest.dtype == file_dtype and dest.device.type == "cpu" and dest.is_contiguous():
                    f.readinto(dest.view(-1).view(torch.uint8).numpy())  # straight from disk into the parameter
                    return
                whole = dest if dest.is_contiguous() else torch.empty(dest.shape, dtype=dest.dtype, device=dest.device)
                flat, chunk = whole.view(-1), READ_CHUNK  # else cast / move piece by piece: no full-size temp
                buf = torch.empty(min(chunk, flat.numel()), dtype=file_dtype)
                for i in range(0, flat.numel(), chunk):
                    piece = buf[:min(chunk, flat.numel() - i)]
                    f.readinto(piece.view(torch.uint8).numpy())
                    flat[i:i + piece.numel()].copy_(piece)
                if whole is not dest:  # a strided destination (a transposed view): filled from the whole tensor
                    dest.copy_(whole)

        entries[name] = _Entry(shape, fill)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{file}: tensors {first!r} and {second!r} overlap in the data")
    return entries


def torch_entries(file: Path, subkey: str | None = None) -> dict[str, _Entry]:
    """The tensors of a torch.save file (pytorch_model*.bin, Audio-MAE's .pth), unpickled with weights_only=True:
    tensors, containers and numbers only, no arbitrary objects. The training-arguments Namespace that MAE-family
    checkpoints carry is the one class allowed besides. subkey: take the state dict from that entry ("model")."""
    def read(mmap):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)

    with open(file, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{file}: a Git LFS pointer, not the weights (the repository was cloned without "
                              "them: `git lfs pull` there, or download the file itself)")

    try:
        try:
            obj = read(mmap=True)
        except RuntimeError as e:  # files in the pre-1.6 format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = read(mmap=False)
    except Exception as e:  # unpickling raises many types; each becomes one clear error naming the file (torch's
        # advice to retry with weights_only=False, which would run whatever the file holds, is left out)
        found = re.search(r"WeightsUnpickler error: ([^.]*)", str(e))
        why = found[1] if found else (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{file}: cannot be read as a weights-only torch checkpoint ({why})") from None
    state = obj[subkey] if isinstance(obj, dict) and subkey in obj else obj
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors" + (f" (or one under {subkey!r})" if subkey else ""))
    return {k: _Entry(t.shape, lambda dest, t=t: dest.copy_(t)) for k, t in state.items()}


def check_keys(shards: dict[Path, dict], expected: dict[str, tuple], optional: set, dropped: tuple, path: Path):
    """Every expected key exactly once with its shape; keys in `optional` may be absent, keys matching one of the
    `dropped` patterns (fnmatch: "head.*") are left out on purpose; nothing else. Raises before any tensor is read."""
    found, problems = {}, []
    for file, entries in shards.items():
        for key in entries:
            if key in found:
                problems.append(f"{key!r} is stored twice ({found[key].name} and {file.name})")
            found[key] = file
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(k for k in set(found) - set(expected) if not any(fnmatch.fnmatchcase(k, p) for p in dropped))
    wrong = [f"{k} in {found[k].name}: expected {expected[k]}, found {shards[found[k]][k].shape}"
             for k in sorted(set(found) & set(expected)) if shards[found[k]][k].shape != expected[k]]

    def listing(keys, limit=8):
        return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")

    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong)}")
    if problems:
        files = ", ".join(sorted(f.name for f in shards))
        raise CheckpointError(f"{path} ({files}): " + "; ".join(problems))
