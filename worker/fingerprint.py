"""A short, stable name for "this model, this tokenizer, this chat template".

Checkpoints are only valid for the exact weights, config, tokenizer and template
that produced them. Hashing 80 GB of weights at every start is too slow, so a
weight file counts by its size, its safetensors header (every tensor's name,
dtype, shape and offsets) and 64 evenly spaced 64 KiB samples of its bytes (all
of it when small): enough to tell a fine-tune or another seed apart. Config,
tokenizer and template files count in full.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_WHOLE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenizer.model",
)


def model_fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _WHOLE_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        digest.update(_safetensors_header(path))
        digest.update(_sampled_bytes(path))
    return digest.hexdigest()[:20]


_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10


def _sampled_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            digest.update(f.read())
            return digest.digest()
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.digest()


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return b""
        (length,) = struct.unpack("<Q", raw)
        return f.read(min(length, 64 << 20))
