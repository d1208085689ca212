"""The application's state, under typed `web.AppKey`s (set by `proxy.app`)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.config import ProxyConfig
from proxy.metrics import Metrics
from proxy.served_model import ModelRegistry


@dataclass
class Lifecycle:
    """Whether the proxy still takes new requests (False once shutdown began)."""

    accepting: bool = True


CONFIG = web.AppKey("config", ProxyConfig)
REGISTRY = web.AppKey("registry", ModelRegistry)
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Metrics)
