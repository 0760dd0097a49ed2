"""The hub check: a direct probe, except behind a proxy, where only the libraries can tell."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from satrun import hub

PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_checked", {})
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)


def test_an_endpoint_that_does_not_answer_is_unreachable(nowhere: None) -> None:
    assert not hub.reachable()
    assert hub.prepare(__file__) == ""  # a local path needs no hub, and changes nothing
    assert not constants.HF_HUB_OFFLINE


def test_behind_a_proxy_the_libraries_are_left_to_try(nowhere: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.reachable()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the endpoint bypasses the proxy: probed directly
    assert not hub.reachable()


def test_offline_mode_is_never_probed(nowhere: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    assert not hub.reachable()
