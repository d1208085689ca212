"""What is running: this package's version and those of the libraries that decide its output.

Read from the installed distributions' metadata, so nothing here imports MLX.
"""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGE = "mlx-cache-proxy"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """{version, mlx, mlx_lm, python}: the labels of the build_info metric, and what --version prints."""
    return {
        "version": _version(PACKAGE),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "python": platform.python_version(),
    }


def version_text() -> str:
    v = versions()
    return f"{PACKAGE} {v['version']} (mlx {v['mlx']}, mlx-lm {v['mlx_lm']}, Python {v['python']})"
