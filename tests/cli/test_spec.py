"""The typed backend spec: what the command line and an exports-file entry make of a backend."""

from __future__ import annotations

from ninep.cli.config import ExportConfig
from ninep.cli.main import build_parser
from ninep.cli.spec import BackendSpec, ProxyOptions, spec_from_args, spec_from_export
from ninep.server.policy import OperationPolicy


def _serve_args(*argv: str):  # noqa: ANN202
    return build_parser().parse_args(["serve", "/srv/x", *argv])


def test_the_command_line_gives_every_backend_option() -> None:
    args = _serve_args("--readonly", "--security-model", "mapped-file", "--multidevs", "warn", "--fmode", "0640",
                       "--dmode", "750", "--no-inline-metadata", "--allow-devices")
    assert spec_from_args("/srv/x", args) == BackendSpec(
        path="/srv/x", security_model="mapped-file", readonly=True, multidevs="warn", inline_metadata=False,
        fmode=0o640, dmode=0o750, policy=OperationPolicy(readonly=True, allow_devices=True), proxy=None)


def test_proxy_options_only_when_the_proxy_serves() -> None:
    assert spec_from_args("/srv/x", _serve_args()).proxy is None
    spec = spec_from_args("/srv/x", _serve_args("--proxy", "--proxy-model", "none", "--user", "daemon"))
    assert spec.proxy == ProxyOptions(model="none", user="daemon")
    assert spec_from_args("/srv/x", _serve_args("--security-model", "proxy")).proxy == ProxyOptions()


def test_an_exports_file_entry_gives_the_same_spec() -> None:
    policy = OperationPolicy(allow_setid=True)
    ec = ExportConfig("home", "/srv/home", "home", security_model="mapped-xattr", readonly=True, fmode=0o600,
                      dmode=0o700, multidevs="forbid", policy=policy)
    assert spec_from_export(ec) == BackendSpec(
        path="/srv/home", security_model="mapped-xattr", readonly=True, multidevs="forbid", fmode=0o600,
        dmode=0o700, policy=policy)
    assert spec_from_export(ExportConfig("p", "/srv/p", "p", security_model="proxy")).proxy == ProxyOptions()
