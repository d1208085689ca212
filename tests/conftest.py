"""Fixtures shared by every test level: tiny real models, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_home(tmp_path_factory):
    """Every process the tests start keeps its default model and disk tier in a fresh directory.

    `serve` writes checkpoints to disk by default; without this, one test run (or a
    developer's own service) would leave cache hits for the next.
    """
    home = tmp_path_factory.mktemp("cache-home")
    previous = os.environ.get("MLX_CACHE_PROXY_HOME")
    os.environ["MLX_CACHE_PROXY_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("MLX_CACHE_PROXY_HOME", None)
    else:
        os.environ["MLX_CACHE_PROXY_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(arch, template="chatml")` -> the path of a tiny real mlx-lm model, built once."""
    built: dict[tuple[str, str], Path] = {}

    def build(arch: str, template: str = "chatml") -> Path:
        key = (arch, template)
        if key not in built:
            from worker.tiny_models import make_model

            built[key] = make_model(arch, tmp_path_factory.mktemp(f"{arch}-{template}"), seed=0, template=template)
        return built[key]

    return build


@pytest.fixture(scope="session")
def harmony_vocab(tmp_path_factory):
    """openai-harmony's o200k vocabulary, offline: TIKTOKEN_ENCODINGS_BASE names it (processes started later inherit it)."""
    from proxy.harmony import VOCAB_ENV
    from tests.harmony_fixtures import provide_vocab

    previous = os.environ.get(VOCAB_ENV)
    directory = provide_vocab(tmp_path_factory.mktemp("harmony-vocab"))
    if directory is None:
        pytest.fail("no o200k vocabulary for openai-harmony: install the test extra (quicktok-v1) or set " + VOCAB_ENV)
    yield directory
    if previous is None:
        os.environ.pop(VOCAB_ENV, None)
