"""Where a `--model` value points: a local directory, or a Hugging Face repo id.

HF ids resolve with mlx-lm's own helpers, in mlx-lm's order: the local HF
cache first (`hf_repo_to_path`), then a download (what `mlx_lm.load` does).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mlx_cache_proxy")


class ModelSourceError(RuntimeError):
    """The model is neither a local directory nor a resolvable HF repo, or not a model."""


def check_model_dir(path: Path, model: str) -> Path:
    """`path` when it holds a loadable model, else ModelSourceError naming what is missing."""
    from worker.model_files import NotAModelDirectory
    from worker.model_files import check_model_dir as check

    try:
        return check(path, model)
    except NotAModelDirectory as exc:
        raise ModelSourceError(str(exc)) from None


def resolve_model_path(model: str, *, download: bool = False) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{model!r} is a file, not a model directory")
        return path.resolve()
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelSourceError(f"{model!r} is not a directory and does not look like an HF repo id")
    from mlx_lm import utils as mlx_utils

    try:
        return Path(mlx_utils.hf_repo_to_path(model))
    except Exception as cached_exc:  # not in the local HF cache
        if not download:
            raise ModelSourceError(f"{model!r} is not in the local Hugging Face cache: {cached_exc}") from cached_exc
        log.info("downloading %s from the Hugging Face hub", model)
        try:
            return Path(mlx_utils._download(model))
        except Exception as exc:
            raise ModelSourceError(f"cannot download {model!r}: {exc}") from exc
