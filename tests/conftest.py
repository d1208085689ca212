"""Fixtures shared by every test level: tiny real models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


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
