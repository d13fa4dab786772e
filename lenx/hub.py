"""The Hugging Face Hub, when it cannot be reached: fail (or load from the cache) at once, not after retries.

huggingface_hub retries a failed connection five times with back-off (about 30 s) before transformers or
datasets give up. Before a hub name is loaded, `offline_unless_reachable` tries one TCP connection to the
Hub's endpoint (HF_ENDPOINT, default https://huggingface.co, or the proxy that HTTPS_PROXY names); if that fails within a few seconds, the load
runs in the libraries' own offline mode (as HF_HUB_OFFLINE=1 would): the HF cache answers, or the load fails
at once with the library's "not in the cache" error.
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

PROBE_SECONDS = 3.0


def is_path(name: str) -> bool:
    """Whether a model or tokenizer name can only be a path, not a hub id ("name" or "org/name")."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def probe_address() -> tuple[str | None, int]:
    """Where a connection to the Hub first goes: the endpoint's host and port, or its proxy's (HTTPS_PROXY etc.,
    unless NO_PROXY exempts the host)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    proxy = getproxies().get(url.scheme) or getproxies().get("all")
    if proxy and url.hostname and not proxy_bypass(url.hostname):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether one TCP connection to the Hub's endpoint (or its proxy) opens within `timeout` seconds, name
    lookup included."""
    host, port = probe_address()
    if not host:
        return False
    ok = []

    def probe() -> None:  # in a thread, so that a hanging name lookup is bounded too
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@lru_cache(maxsize=1)
def unreachable() -> bool:
    """`not reachable()`, probed once per process."""
    return not reachable()


def offline_reason(datasets_too: bool = False) -> str | None:
    """Why hub names must come from the HF cache: "environment" (HF_HUB_OFFLINE, and with `datasets_too`
    HF_DATASETS_OFFLINE), "unreachable" (the probe failed), or None (online)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if datasets_too:
        import datasets.config

        offline = offline or datasets.config.HF_HUB_OFFLINE
    if offline:
        return "environment"
    return "unreachable" if unreachable() else None


def unreachable_note(reason: str | None) -> str:
    return "the Hub cannot be reached and the HF cache lacks it; " if reason == "unreachable" else ""


@contextmanager
def offline_unless_reachable():
    """For `datasets`: yields `offline_reason(datasets_too=True)`; when that is "unreachable", huggingface_hub
    and datasets run in their offline mode inside (restored after)."""
    import datasets.config
    from huggingface_hub import constants

    reason = offline_reason(datasets_too=True)
    if reason != "unreachable":
        yield reason
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
