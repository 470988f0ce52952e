"""Fixtures of the end-to-end suite: every test runs over each transport and each backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fs_backends.base import Backend
from tests.kits.harness import TRANSPORTS


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _local(path: Path, **kw: object) -> Backend:
    from fs_backends.local import LocalBackend

    return LocalBackend(str(path), **kw)  # type: ignore[arg-type]


def _memory(path: Path, **kw: object) -> Backend:
    from fs_backends.memory import MemoryBackend

    return MemoryBackend(**kw)  # type: ignore[arg-type]


def _proxy(path: Path, **kw: object) -> Backend:
    from fs_backends.proxy import proxy_backend

    return proxy_backend(str(path), **kw)  # type: ignore[arg-type]


BACKENDS: dict[str, Callable[..., Backend]] = {"memory": _memory, "local": _local, "proxy": _proxy}


@pytest.fixture(params=sorted(BACKENDS))
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind = str(request.param)
    if kind == "local":
        pytest.importorskip("fs_backends.local", reason="local backend lands with its own branch")
    return kind


@pytest.fixture
def make_backend(backend_kind: str, tmp_path: Path) -> Callable[..., Backend]:
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    os.chmod(export, 0o755)

    def make(**kw: object) -> Backend:
        return BACKENDS[backend_kind](export, **kw)

    make.export = export  # type: ignore[attr-defined]
    return make


@pytest.fixture
def serve(transport: str, backend_kind: str, make_backend: Callable[..., Backend], tmp_path: Path) -> Callable[..., None]:
    """`serve(scenario, options=…, **backend_kw)` runs `await scenario(server, connect)` against a
    fresh server on this test's transport and backend, inside one trio run with a time limit."""
    import trio

    from tests.kits.harness import served

    def run(scenario: Callable[..., Any], *, options: Any = None, timeout: float = 60, **backend_kw: object) -> None:
        async def main() -> None:
            with trio.fail_after(timeout):
                async with served(make_backend(**backend_kw), transport, tmp_path, options) as (server, connect):
                    await scenario(server, connect)

        trio.run(main)

    run.export = make_backend.export  # type: ignore[attr-defined]
    run.kind = backend_kind  # type: ignore[attr-defined]
    run.transport = transport  # type: ignore[attr-defined]
    return run
