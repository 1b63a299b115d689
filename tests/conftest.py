"""Shared test setup: tiny models are built into a per-session temporary cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Point PEFTCLI_CACHE at a fresh directory so tests never read or write the user's cache."""
    old = os.environ.get("PEFTCLI_CACHE")
    os.environ["PEFTCLI_CACHE"] = str(tmp_path_factory.mktemp("peftcli-cache"))
    yield os.environ["PEFTCLI_CACHE"]
    if old is None:
        os.environ.pop("PEFTCLI_CACHE", None)
    else:
        os.environ["PEFTCLI_CACHE"] = old
