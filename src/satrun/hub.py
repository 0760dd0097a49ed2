"""Hugging Face hub ids (models, tokenizers, datasets) on a machine that may not reach the hub.

Without a network the libraries retry each request for about a minute and log every attempt.
Before a hub id is looked up, satrun checks once whether the hub answers; if it does not, the
libraries are put in their offline mode (their local cache only), so a cached id still loads and
a missing one fails at once, with one line that says why.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

_checked: dict[str, bool] = {}


def is_local(location: str) -> bool:
    return Path(location).expanduser().exists()


def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint ($HF_ENDPOINT, else huggingface.co) accepts a connection
    (False in offline mode, HF_HUB_OFFLINE=1); asked once per process. Behind a proxy the
    libraries' own requests are the only honest test: then it is taken as reachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    proxies = getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not proxy_bypass(url.hostname or ""):
        return True
    if url.hostname not in _checked:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
            _checked[url.hostname] = True
        except OSError:
            _checked[url.hostname] = False
    return _checked[url.hostname]


def prepare(location: str) -> str:
    """Call before ``location`` is looked up. A local path: nothing to do. A hub id where the
    hub cannot be reached: the libraries go offline (cache only). Returns what an error about
    ``location`` should add ("" or a note that the hub is out of reach)."""
    if is_local(location) or reachable():
        return ""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    return f"{constants.ENDPOINT} cannot be reached and {location!r} is not in the local Hugging Face cache"
