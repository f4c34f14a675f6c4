"""Fixtures of the web page tests."""

from __future__ import annotations

import pytest
from serve_helpers import write_demo_layout


@pytest.fixture(scope="session")
def demo_layout(tmp_path_factory):
    return write_demo_layout(tmp_path_factory.mktemp("serve_demo"))
