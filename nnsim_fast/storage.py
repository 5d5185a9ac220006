"""Crash-safe, verifiable files of named tensors (the safetensors format).

Writing: the tensors stream into a temporary file of our own beside the target
(``.<name>.<pid>.<random>.nnsim-partial``), which is flushed, fsync'ed and then
renamed over the target, and the directory entry is fsync'ed too.  So a reader
sees either the old file or the new one, never a mix.  A crash (``kill -9``,
power loss) can leave only such a temporary file behind; the next save into
the same directory removes every one of ours whose writing process is gone.

Reading goes through the ``safetensors`` library (no pickle is ever executed),
and every tensor is checked against the BLAKE2b digest stored in the file's
metadata, so a flipped byte anywhere in the data is an error, not a changed
number.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from typing import Dict, Iterable, Mapping, Tuple

import torch

__all__ = ["write_tensors", "read_tensors", "digest", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".nnsim-partial"
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}
_CHUNK = 1 << 24


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def digest(tensor: torch.Tensor) -> str:
    """BLAKE2b-128 of the tensor's little-endian bytes (its identity in a file)."""
    return hashlib.blake2b(_raw_bytes(tensor), digest_size=16).hexdigest()


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    entries: Dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, value in tensors.items():
        if value.dtype not in _DTYPES:
            raise TypeError(f"cannot store tensor {key!r} of dtype {value.dtype}")
        size = value.numel() * value.element_size()
        entries[key] = {"dtype": _DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)        # data starts 8-byte aligned


def _remove_stale_partials(directory: str, base: str) -> None:
    prefix = f".{base}."
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        pid_text = name[len(prefix):-len(PARTIAL_SUFFIX)].split(".")[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                  ) -> None:
    """Write ``tensors`` (in the given order) and string ``metadata`` to ``path`` atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_stale_partials(directory, base)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    header = _header(tensors, metadata)
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)))
            handle.write(header)
            for value in tensors.values():
                data = _raw_bytes(value)
                for start in range(0, len(data), _CHUNK):
                    handle.write(data[start:start + _CHUNK])
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # as a plain open() would have created the target
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_tensors(path: str, what: str = "file") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; unreadable files raise ValueError/OSError."""
    from safetensors import SafetensorError, safe_open
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a {what}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"no permission to read the {what} at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path!r} is not a readable {what}: {error}") from None
    return tensors, metadata


def verify_digests(tensors: Mapping[str, torch.Tensor], digests: Mapping[str, str],
                   names: Iterable[str]) -> None:
    """Every tensor in ``names`` must be present, listed, and match its digest."""
    for key in names:
        if key not in digests:
            raise ValueError(f"tensor {key!r} has no checksum")
        if key not in tensors:
            raise ValueError(f"tensor {key!r} is missing")
        if digest(tensors[key]) != digests[key]:
            raise ValueError(f"tensor {key!r} does not match its checksum (the file is corrupt)")
