"""Fixtures of the guest suite: the guest image (built once per cache directory) and the
accelerator. Building installs missing host packages with apt, so CI on a fresh machine works."""

from __future__ import annotations

import pytest

from tests.guest import guestvm


@pytest.fixture(scope="session")
def guest_image() -> guestvm.GuestImage:
    return guestvm.build_image()


@pytest.fixture(scope="session")
def accel() -> guestvm.Accel:
    return guestvm.detect_accel()


@pytest.fixture(scope="session", params=guestvm.KERNELS)
def kernel_image(request: pytest.FixtureRequest) -> guestvm.GuestImage:
    """The guest image for each kernel in guestvm.KERNELS (bookworm 6.1, sid 7.x)."""
    return guestvm.build_image(kernel=str(request.param))
