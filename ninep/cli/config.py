"""The exports file (`ninep serve --config FILE`, `ninep check-config FILE`): TOML → dataclasses.

    [server]                      # all optional
    msize = "512K"                # or an integer
    tag = "ninep"
    insecure = false
    trace = false

    [listeners]                   # name = address; exports name the ones that may reach them
    local = "unix:/run/ninep.sock"
    vm = "vhost-user:/run/vm.sock"

    [limits]                      # any numeric SessionOptions field except max_msize
    max_fids = 4096

    [exports.home]                # one table per export; the key is its name
    path = "/srv/home"            # required; "memory:" for an in-memory tree
    aname = "home"                # default: the name; "" = attach by any unmatched aname
    security_model = "mapped-xattr"
    readonly = false
    fmode = "0640"                # or 0o640
    dmode = "0750"
    multidevs = "remap"
    listeners = ["local"]         # listener names or addresses; default: every listener

    [exports.home.policy]         # the fields of ninep.server.policy.OperationPolicy
    allow_devices = false

    [tls]
    cert = "server.pem"
    key = "server.key"
    client_ca = "clients.pem"
    [[tls.client]]
    subject = "CN=alice"
    export = "home"               # optional: the only export this subject may attach
    uid = 1000                    # optional: the uid its attaches get

Relative paths are relative to the file's directory. Every error is a `ConfigError` whose text
starts with `FILE:LINE:` — tomllib's syntax errors carry their own position; for unknown keys,
wrong types and bad values the line is found by scanning the text for the key (`_KeyLines`).

This module must never create backends, bind listeners or change a running server: it only reads
and validates (`ninep.cli.main` builds what it describes).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ninep.cli.parsing import MAX_MSIZE, MULTIDEVS, SECURITY_MODELS, parse_octal, parse_size
from ninep.server.exports import normalize_aname
from ninep.server.identity import IdentityRule
from ninep.server.policy import OperationPolicy
from ninep.server.session import SessionOptions

Path = tuple[str | int, ...]


class ConfigError(ValueError):
    def __init__(self, message: str, file: str = "", line: int | None = None) -> None:
        self.message, self.file, self.line = message, file, line
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    address: str


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    #: Absolute host path, or "memory:".
    path: str
    #: Normalized (ninep.server.exports.normalize_aname).
    aname: str
    security_model: str | None = None
    readonly: bool = False
    fmode: int | None = None
    dmode: int | None = None
    multidevs: str = "remap"
    policy: OperationPolicy = field(default_factory=OperationPolicy)
    #: Listener names allowed to reach it; None: every listener.
    listeners: frozenset[str] | None = None
    #: Where its table starts (messages only; not part of what makes two configs equal).
    line: int = field(default=0, compare=False)

    def backend_key(self) -> tuple[object, ...]:
        """What the backend depends on: exports equal in this can share one backend."""
        return (self.path, self.security_model, self.readonly, self.fmode, self.dmode, self.multidevs)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    #: Client-certificate subject → what it may do (ninep.server.identity).
    identities: Mapping[str, IdentityRule] = field(default_factory=dict)


@dataclass(slots=True)
class ServerConfig:
    file: str = ""
    listeners: list[ListenerConfig] = field(default_factory=list)
    msize: int | None = None
    tag: str | None = None
    insecure: bool = False
    trace: bool = False
    #: SessionOptions field → value.
    limits: dict[str, int | float] = field(default_factory=dict)
    exports: list[ExportConfig] = field(default_factory=list)
    tls: TlsConfig | None = None

    def server_wide(self) -> tuple[object, ...]:
        """Everything a reload cannot change (it needs a restart)."""
        tls = (self.tls.cert, self.tls.key, self.tls.client_ca) if self.tls else None
        return (self.listeners, self.msize, self.tag, self.insecure, self.trace, self.limits, tls)


# --- where keys are ------------------------------------------------------------------------------


_BARE = re.compile(r"[A-Za-z0-9_-]+")


class _KeyLines:
    """Line numbers of the keys and table headers of a (syntactically valid) TOML text.

    A small scanner, not a parser: it follows table headers (`[a.b]`, `[[a.b]]` with their array
    index) and `key = value` lines (dotted and quoted keys), and skips multi-line strings and
    arrays so their contents are never mistaken for keys. Keys inside inline tables resolve to
    the line of the key holding the table, which is the same line."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        counts: dict[Path, int] = {}
        table: Path = ()
        depth, in_ml = 0, ""
        for no, raw in enumerate(text.splitlines(), 1):
            line = raw
            if in_ml or depth:
                depth, in_ml = self._scan_value(line, depth, in_ml)
                continue
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s.startswith("[["):
                keys, _ = self._keys(s[2:])
                base = tuple(keys)
                counts[base] = counts.get(base, -1) + 1
                table = (*base, counts[base])
                self._record(table, no)
                continue
            if s.startswith("["):
                keys, _ = self._keys(s[1:])
                table = tuple(keys)
                self._record(table, no)
                continue
            keys, rest = self._keys(s)
            if not keys or not rest.startswith("="):
                continue
            self._record((*table, *keys), no)
            depth, in_ml = self._scan_value(rest[1:], 0, "")

    def _record(self, path: Path, no: int) -> None:
        for i in range(1, len(path) + 1):
            self.lines.setdefault(path[:i], no)
        self.lines[path] = no

    @staticmethod
    def _keys(s: str) -> tuple[list[str], str]:
        """A dotted key at the start of `s`; returns its parts and what follows it."""
        keys: list[str] = []
        i = 0
        while True:
            while i < len(s) and s[i] in " \t":
                i += 1
            if i < len(s) and s[i] in "\"'":
                q = s[i]
                j = i + 1
                buf = []
                while j < len(s) and s[j] != q:
                    if q == '"' and s[j] == "\\" and j + 1 < len(s):
                        j += 1
                    buf.append(s[j])
                    j += 1
                keys.append("".join(buf))
                i = j + 1
            else:
                mt = _BARE.match(s, i)
                if not mt:
                    return keys, s[i:].lstrip()
                keys.append(mt.group())
                i = mt.end()
            while i < len(s) and s[i] in " \t":
                i += 1
            if i < len(s) and s[i] == ".":
                i += 1
                continue
            return keys, s[i:]

    @staticmethod
    def _scan_value(s: str, depth: int, in_ml: str) -> tuple[int, str]:
        """Follows brackets and strings through one line of a value."""
        i = 0
        while i < len(s):
            if in_ml:
                if in_ml == '"""' and s[i] == "\\":
                    i += 2
                    continue
                if s.startswith(in_ml, i):
                    i += 3
                    in_ml = ""
                    continue
                i += 1
                continue
            c = s[i]
            if s.startswith('"""', i) or s.startswith("'''", i):
                in_ml = s[i:i + 3]
                i += 3
                continue
            if c in "\"'":
                j = i + 1
                while j < len(s) and s[j] != c:
                    j += 2 if c == '"' and s[j] == "\\" else 1
                i = j + 1
                continue
            if c == "#":
                break
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            i += 1
        return depth, in_ml

    def line_of(self, path: Path) -> int | None:
        """The line of `path`, or of its nearest ancestor the text names."""
        for i in range(len(path), 0, -1):
            no = self.lines.get(path[:i])
            if no is not None:
                return no
        return None


# --- reading tables ---------------------------------------------------------------------------------


def _dotted(path: Path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + (p if _BARE.fullmatch(p) else f'"{p}"')
    return out


_TYPE_NAMES = {bool: "a boolean", int: "an integer", str: "a string", float: "a number", list: "an array",
               dict: "a table"}


def _what(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class _Reader:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.where = _KeyLines(text)

    def error(self, path: Path, message: str) -> ConfigError:
        return ConfigError(f"{_dotted(path)}: {message}" if path else message, self.file, self.where.line_of(path))

    def table(self, data: Any, path: Path) -> Table:
        if not isinstance(data, dict):
            raise self.error(path, f"expected a table, got {_what(data)}")
        return Table(self, data, path)


class Table:
    """One TOML table being read: every key must be taken, or `done` reports it as unknown."""

    def __init__(self, reader: _Reader, data: dict[str, Any], path: Path) -> None:
        self.r, self.data, self.path = reader, data, path
        self.seen: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        return self.r.error(self.path if key is None else (*self.path, key), message)

    def _get(self, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return None
        v = self.data[key]
        # bool is an int in Python, never in TOML.
        if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
            raise self.error(key, f"expected {what}, got {_what(v)}")
        return v

    def get_bool(self, key: str, default: bool = False) -> bool:
        v = self._get(key, bool, "a boolean")
        return default if v is None else bool(v)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        v = self._get(key, str, "a string")
        return default if v is None else str(v)

    def get_int(self, key: str) -> int | None:
        v = self._get(key, int, "an integer")
        return None if v is None else int(v)

    def get_number(self, key: str) -> int | float | None:
        v: int | float | None = self._get(key, (int, float), "a number")
        return v

    def get_str_or_int(self, key: str) -> str | int | None:
        v: str | int | None = self._get(key, (str, int), "a string or an integer")
        return v

    def get_str_list(self, key: str) -> list[str] | None:
        v = self._get(key, list, "an array of strings")
        if v is None:
            return None
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise self.r.error((*self.path, key, i), f"expected a string, got {_what(item)}")
        return list(v)

    def sub(self, key: str) -> Table | None:
        self.seen.add(key)
        if key not in self.data:
            return None
        return self.r.table(self.data[key], (*self.path, key))

    def array_of_tables(self, key: str) -> list[Table]:
        self.seen.add(key)
        v = self.data.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.error(key, f"expected an array of tables ([[{_dotted((*self.path, key))}]]), got {_what(v)}")
        return [self.r.table(item, (*self.path, key, i)) for i, item in enumerate(v)]

    def take_all(self) -> list[str]:
        self.seen.update(self.data)
        return list(self.data)

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(key, "unknown key")


# --- the file ---------------------------------------------------------------------------------------


def limit_fields() -> dict[str, type]:
    """SessionOptions fields an exports file may set in [limits]: the numeric ones (a limit a
    later change adds to SessionOptions is settable with no change here), except max_msize,
    which is `[server] msize`."""
    out: dict[str, type] = {}
    for f in dataclasses.fields(SessionOptions):
        d = f.default
        if f.name != "max_msize" and isinstance(d, (int, float)) and not isinstance(d, bool):
            out[f.name] = type(d)
    return out


def _mode(t: Table, key: str) -> int | None:
    v = t.get_str_or_int(key)
    if v is None:
        return None
    if isinstance(v, int):
        if not 0 <= v <= 0o7777:
            raise t.error(key, f"mode out of range: {v:o} (octal)")
        return v
    try:
        return parse_octal(v)
    except Exception as e:  # argparse.ArgumentTypeError
        raise t.error(key, str(e)) from None


def _host_path(base: str, text: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(text)))


def _policy(t: Table | None, readonly: bool) -> OperationPolicy:
    kwargs: dict[str, bool] = {}
    if t is not None:
        names = {f.name for f in dataclasses.fields(OperationPolicy)}
        for key in t.take_all():
            if key not in names:
                raise t.error(key, f"unknown policy key (known: {', '.join(sorted(names))})")
            kwargs[key] = t.get_bool(key)
    if readonly:
        kwargs["readonly"] = True
    return OperationPolicy(**kwargs)


def _export(r: _Reader, name: str, t: Table, base: str, listeners: dict[str, str]) -> ExportConfig:
    line = r.where.line_of(t.path) or 0
    if not name:
        raise t.error(None, "an export needs a non-empty name")
    path_text = t.get_str("path")
    if path_text is None:
        raise t.error(None, "missing key 'path' (the host directory, or \"memory:\")")
    if path_text == "memory:":
        path = path_text
    else:
        path = _host_path(base, path_text)
        if not os.path.isdir(path):
            raise t.error("path", f"{path!r} is not a directory")
    aname_text = t.get_str("aname", name)
    assert aname_text is not None
    if ".." in aname_text.split("/"):
        raise t.error("aname", "an aname cannot contain '..'")
    model = t.get_str("security_model")
    if model is not None and model not in SECURITY_MODELS:
        raise t.error("security_model", f"unknown model {model!r} (one of {', '.join(SECURITY_MODELS)})")
    if model == "proxy":
        # The proxy confines the whole server process after start-up (chroot, setuid), after
        # which no other export could be opened by a reload.
        raise t.error("security_model", "the proxy model is only available with a single export on the command line")
    multidevs = t.get_str("multidevs", "remap")
    if multidevs not in MULTIDEVS:
        raise t.error("multidevs", f"must be one of {', '.join(MULTIDEVS)}, not {multidevs!r}")
    allowed: frozenset[str] | None = None
    names = t.get_str_list("listeners")
    if names is not None:
        by_address = {a: n for n, a in listeners.items()}
        out = set()
        for i, n in enumerate(names):
            if n in listeners:
                out.add(n)
            elif n in by_address:
                out.add(by_address[n])
            else:
                raise r.error((*t.path, "listeners", i), f"no listener is named or listens on {n!r}")
        allowed = frozenset(out)
    readonly = t.get_bool("readonly")
    fmode, dmode = _mode(t, "fmode"), _mode(t, "dmode")
    policy = _policy(t.sub("policy"), readonly)
    t.done()
    return ExportConfig(name, path, normalize_aname(aname_text), model, policy.readonly, fmode, dmode,
                        str(multidevs), policy, allowed, line)


def _tls(r: _Reader, t: Table, base: str, exports: set[str]) -> TlsConfig:
    files: dict[str, str | None] = {}
    for key in ("cert", "key", "client_ca"):
        v = t.get_str(key)
        if v is not None:
            v = _host_path(base, v)
            if not os.path.isfile(v):
                raise t.error(key, f"{v!r} is not a file")
        files[key] = v
    identities: dict[str, IdentityRule] = {}
    for c in t.array_of_tables("client"):
        subject = c.get_str("subject")
        if not subject:
            raise c.error(None, "missing key 'subject' (the client certificate's subject, e.g. \"CN=alice\")")
        if subject in identities:
            raise c.error("subject", f"subject {subject!r} appears twice")
        export = c.get_str("export")
        if export is not None and export not in exports:
            raise c.error("export", f"no export is named {export!r}")
        uid = c.get_int("uid")
        if uid is not None and not 0 <= uid < 2**32 - 1:
            raise c.error("uid", f"uid out of range: {uid}")
        c.done()
        identities[subject] = IdentityRule(export, uid)
    t.done()
    return TlsConfig(files["cert"], files["key"], files["client_ca"], identities)


def parse(text: str, file: str = "<exports>") -> ServerConfig:
    """The configuration `text` describes; ConfigError (with FILE:LINE) if it is not valid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        mt = re.search(r"at line (\d+)", str(e))
        line = int(mt.group(1)) if mt else text.count("\n") + 1  # "at end of document"
        raise ConfigError(str(e), file, line) from None
    r = _Reader(file, text)
    base = os.path.dirname(os.path.abspath(file)) if file and not file.startswith("<") else os.getcwd()
    root = Table(r, data, ())
    cfg = ServerConfig(file=file)

    server = root.sub("server")
    if server is not None:
        ms = server.get_str_or_int("msize")
        if ms is not None:
            try:
                cfg.msize = parse_size(str(ms))
            except (ValueError, IndexError):
                raise server.error("msize", f"not a size: {ms!r} (e.g. 524288, \"512K\", \"1M\")") from None
            if not 4096 <= cfg.msize <= MAX_MSIZE:
                raise server.error("msize", f"must be between 4096 and {MAX_MSIZE}")
        cfg.tag = server.get_str("tag")
        if cfg.tag is not None and not 1 <= len(cfg.tag.encode()) <= 31:
            raise server.error("tag", "a mount tag is 1 to 31 bytes")
        cfg.insecure = server.get_bool("insecure")
        cfg.trace = server.get_bool("trace")
        server.done()

    listeners: dict[str, str] = {}
    lt = root.sub("listeners")
    if lt is not None:
        from transports.address import split
        from transports.options import AddressError

        for name in lt.take_all():
            address = lt.data[name]
            if not isinstance(address, str):
                raise lt.error(name, f"expected an address string, got {_what(address)}")
            try:
                split(address)
            except AddressError as e:
                raise lt.error(name, str(e)) from None
            if address in listeners.values():
                raise lt.error(name, f"address {address!r} is listed twice")
            listeners[name] = address
            cfg.listeners.append(ListenerConfig(name, address))

    limits = root.sub("limits")
    if limits is not None:
        known = limit_fields()
        for key in limits.take_all():
            kind = known.get(key)
            if kind is None:
                raise limits.error(key, f"unknown limit (known: {', '.join(sorted(known))})")
            v = limits.get_int(key) if kind is int else limits.get_number(key)
            assert v is not None
            if v < (1 if kind is int else 0):
                raise limits.error(key, f"must be {'at least 1' if kind is int else 'positive'}")
            cfg.limits[key] = v

    exports = root.sub("exports")
    if exports is None or not exports.data:
        raise ConfigError("no exports: add at least one [exports.NAME] table with a path", file,
                          r.where.line_of(("exports",)))
    by_aname: dict[str, str] = {}
    for name in exports.take_all():
        et = r.table(exports.data[name], ("exports", name))
        ec = _export(r, name, et, base, listeners)
        if ec.aname in by_aname:
            raise et.error("aname" if "aname" in et.data else None,
                           f"aname {ec.aname!r} is already used by export {by_aname[ec.aname]!r}")
        by_aname[ec.aname] = name
        cfg.exports.append(ec)

    tls = root.sub("tls")
    if tls is not None:
        cfg.tls = _tls(r, tls, base, {e.name for e in cfg.exports})
    root.done()
    return cfg


def load(file: str) -> ServerConfig:
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the exports file: {e}", file) from None
    return parse(text, file)


__all__ = ["ConfigError", "ExportConfig", "ListenerConfig", "ServerConfig", "TlsConfig", "load", "parse",
           "limit_fields"]
