"""Is a directory a model mlx-lm can load? The files it needs, named when missing.

Stdlib only: the proxy checks a `--model` directory with it before starting a
worker, and the worker checks again before loading (a one-line error, not the
traceback of whichever loader fails first).
"""

from __future__ import annotations

from pathlib import Path

# What `transformers.AutoTokenizer` can build a tokenizer from (any one is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


class NotAModelDirectory(ValueError):
    """A directory without the files of an mlx-lm model; the message names what is missing."""


def missing_model_files(path: Path) -> list[str]:
    """What `path` lacks to be loaded as a model: config.json, weights, a tokenizer."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("model*.safetensors")):  # what mlx_lm.utils.load_model reads
        missing.append("weights (model*.safetensors)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return missing


def check_model_dir(path: Path, name: str | None = None) -> Path:
    """`path`, or NotAModelDirectory naming what it lacks."""
    missing = missing_model_files(path)
    if missing:
        shown = name if name is not None and name != str(path) else str(path)
        where = f" ({path})" if shown != str(path) else ""
        listed = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise NotAModelDirectory(f"{shown!r}{where} is not a model directory: it lacks {listed}")
    return path
