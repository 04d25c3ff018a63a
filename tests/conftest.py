from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on both backends."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _structlog_as_found() -> Iterator[None]:
    """Tests that capture logs configure structlog; later tests must find it as a
    program that never configured it does (warnings only, on stderr)."""
    yield
    structlog.reset_defaults()
