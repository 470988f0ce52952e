"""Parsing the exports file: what a good file means, and that every mistake names its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ninep.cli.config import ConfigError, ExportConfig, limit_fields, load, parse
from ninep.server.identity import IdentityRule
from ninep.server.policy import OperationPolicy


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    (tmp_path / "cert.pem").write_text("x")
    return tmp_path


def write(tmp: Path, text: str) -> str:
    f = tmp / "exports.toml"
    f.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(f)


def fails(tmp: Path, text: str) -> ConfigError:
    f = write(tmp, text)
    with pytest.raises(ConfigError) as e:
        load(f)
    assert str(e.value).startswith(f"{f}:"), str(e.value)
    return e.value


def test_a_full_file_means_what_it_says(dirs: Path) -> None:
    f = write(dirs, f"""
        [server]
        msize = "256K"
        tag = "share"
        trace = true

        [listeners]
        local = "unix:{dirs}/s.sock"
        lan = "tcp:127.0.0.1:5640"

        [limits]
        max_fids = 100
        drain_seconds = 0.5

        [exports.home]
        path = "a"                 # relative to the file
        aname = "/users/home/"
        security_model = "mapped-file"
        fmode = "0640"
        dmode = 0o750
        multidevs = "forbid"
        listeners = ["local", "tcp:127.0.0.1:5640"]

        [exports.home.policy]
        allow_devices = true
        allow_setid = false

        [exports.ro]
        path = "{dirs}/b"
        readonly = true

        [exports.mem]
        path = "memory:"
        aname = ""

        [tls]
        cert = "cert.pem"
        [[tls.client]]
        subject = "CN=alice"
        export = "home"
        uid = 1000
        [[tls.client]]
        subject = "CN=admin"
    """)
    cfg = load(f)
    assert cfg.msize == 256 * 1024 and cfg.tag == "share" and cfg.trace and not cfg.insecure
    assert [(lc.name, lc.address) for lc in cfg.listeners] == [("local", f"unix:{dirs}/s.sock"),
                                                                ("lan", "tcp:127.0.0.1:5640")]
    assert cfg.limits == {"max_fids": 100, "drain_seconds": 0.5}
    home, ro, mem = cfg.exports
    assert home == ExportConfig(
        "home", str(dirs / "a"), "users/home", "mapped-file", False, 0o640, 0o750, "forbid",
        OperationPolicy(allow_devices=True), frozenset({"local", "lan"}))
    assert home.line == 14
    # readonly = true makes the policy read-only too; defaults everywhere else.
    assert ro == ExportConfig("ro", str(dirs / "b"), "ro", readonly=True, policy=OperationPolicy(readonly=True))
    assert ro.listeners is None and ro.security_model is None and ro.fmode is None
    assert mem.path == "memory:" and mem.aname == ""
    assert cfg.tls is not None and cfg.tls.cert == str(dirs / "cert.pem") and cfg.tls.key is None
    assert cfg.tls.identities == {"CN=alice": IdentityRule("home", 1000), "CN=admin": IdentityRule(None, None)}


def test_minimal_file_defaults_aname_to_the_name(dirs: Path) -> None:
    cfg = parse(f'[exports.data]\npath = "{dirs}/a"\n', "x.toml")
    (e,) = cfg.exports
    assert (e.name, e.aname, e.listeners, e.policy) == ("data", "data", None, OperationPolicy())
    assert cfg.listeners == [] and cfg.msize is None and cfg.limits == {} and cfg.tls is None


def test_quoted_names_and_dotted_keys(dirs: Path) -> None:
    cfg = parse(f'exports."my share".path = "{dirs}/a"\n[exports.b]\npolicy.allow_setid = true\npath = "{dirs}/b"\n')
    assert [(e.name, e.aname) for e in cfg.exports] == [("my share", "my share"), ("b", "b")]
    assert cfg.exports[1].policy.allow_setid


def test_syntax_error_carries_tomllibs_line(dirs: Path) -> None:
    e = fails(dirs, """
        [exports.a]
        path = "a"
        readonly = yes
    """)
    assert e.line == 3 and "line 3" in str(e)


def test_unterminated_array_reports_the_last_line(dirs: Path) -> None:
    e = fails(dirs, 'x = [\n1,\n')
    assert e.line == 3


@pytest.mark.parametrize("text, line, needle", [
    ('[exports.a]\npath = "a"\nbogus = 1\n', 3, "exports.a.bogus: unknown key"),
    ('[exports.a]\npath = "a"\n[exports.a.policy]\nallow_devices = true\ndeny_all = true\n', 5,
     "exports.a.policy.deny_all: unknown policy key"),
    ('[server]\nmsize = 8192\nmsise = 1\n[exports.a]\npath = "a"\n', 3, "server.msise: unknown key"),
    ('[limits]\nmax_fids = 3\nmax_cats = 9\n[exports.a]\npath = "a"\n', 3, "limits.max_cats: unknown limit"),
    ('[exports.a]\npath = "a"\n[exprots.b]\npath = "b"\n', 3, "exprots: unknown key"),
    ('[exports.a]\npath = "a"\n[tls]\n[[tls.client]]\nsubject = "x"\n[[tls.client]]\nsubject = "y"\nname = "z"\n', 8,
     "tls.client[1].name: unknown key"),
])
def test_unknown_keys_name_their_line(dirs: Path, text: str, line: int, needle: str) -> None:
    e = fails(dirs, text)
    assert e.line == line and needle in str(e), str(e)


@pytest.mark.parametrize("text, line, needle", [
    ('[exports.a]\npath = "a"\nreadonly = "yes"\n', 3, "exports.a.readonly: expected a boolean, got a string"),
    ('[exports.a]\npath = "a"\nlisteners = "local"\n', 3, "expected an array of strings"),
    ('[listeners]\nl = "unix:/x"\n[exports.a]\npath = "a"\nlisteners = [\n  "l",\n  3,\n]\n', 5,
     "exports.a.listeners[1]: expected a string, got an integer"),
    ('[exports.a]\npath = 3\n', 2, "expected a string, got an integer"),
    ('[exports]\na = 3\n', 2, "exports.a: expected a table, got an integer"),
    ('[server]\nmsize = true\n[exports.a]\npath = "a"\n', 2, "expected a string or an integer, got a boolean"),
    ('[server]\ninsecure = 1\n[exports.a]\npath = "a"\n', 2, "expected a boolean, got an integer"),
    ('[limits]\nmax_fids = 1.5\n[exports.a]\npath = "a"\n', 2, "limits.max_fids: expected an integer"),
    ('[exports.a]\npath = "a"\n[tls]\n[[tls.client]]\nsubject = "x"\nuid = "1000"\n', 6, "expected an integer"),
    ('[exports.a]\npath = "a"\n[exports.a.policy]\nallow_setid = 1\n', 4, "expected a boolean"),
])
def test_wrong_types_name_their_line(dirs: Path, text: str, line: int, needle: str) -> None:
    e = fails(dirs, text)
    assert e.line == line and needle in str(e), str(e)


@pytest.mark.parametrize("value, needle", [
    ('"0999"', "not an octal mode"), ('"rw-r--r--"', "not an octal mode"), ("0o17777", "mode out of range"),
    ("-1", "mode out of range"), ('"17777"', "mode out of range"), ("true", "expected a string or an integer"),
])
def test_bad_octal_modes(dirs: Path, value: str, needle: str) -> None:
    e = fails(dirs, f'[exports.a]\npath = "a"\n\nfmode = {value}\n')
    assert e.line == 4 and "exports.a.fmode" in str(e) and needle in str(e), str(e)


def test_good_modes_as_string_or_integer(dirs: Path) -> None:
    cfg = parse(f'[exports.a]\npath = "{dirs}/a"\nfmode = "600"\ndmode = 0o2775\n')
    assert (cfg.exports[0].fmode, cfg.exports[0].dmode) == (0o600, 0o2775)


@pytest.mark.parametrize("text, line, needle", [
    ('[exports.a]\nreadonly = true\n', 1, "exports.a: missing key 'path'"),
    ('[exports.a]\npath = "nowhere"\n', 2, "is not a directory"),
    ('[exports.a]\npath = "a"\n[exports.b]\npath = "b"\naname = "/a/"\n', 5,
     "aname 'a' is already used by export 'a'"),
    ('[exports.x]\npath = "a"\naname = "b"\n\n[exports.b]\npath = "b"\n', 5, "aname 'b' is already used by export 'x'"),
    ('[exports.a]\npath = "a"\naname = "../etc"\n', 3, "cannot contain '..'"),
    ('[exports.a]\npath = "a"\nsecurity_model = "mapped"\n', 3, "unknown model 'mapped'"),
    ('[exports.a]\npath = "a"\nsecurity_model = "proxy"\n', 3, "only available with a single export"),
    ('[exports.a]\npath = "a"\nmultidevs = "ignore"\n', 3, "must be one of remap, forbid, warn"),
    ('[exports.a]\npath = "a"\nlisteners = ["vm"]\n', 3, "no listener is named or listens on 'vm'"),
    ('[listeners]\nvm = "vsock:3:564"\n[exports.a]\npath = "a"\n', 2, "listeners.vm: unknown address"),
    ('[listeners]\na = "unix:/x"\nb = "unix:/x"\n[exports.a]\npath = "a"\n', 3, "listed twice"),
    ('[server]\nmsize = "lots"\n[exports.a]\npath = "a"\n', 2, "not a size"),
    ('[server]\nmsize = 100\n[exports.a]\npath = "a"\n', 2, "must be between"),
    ('[server]\ntag = ""\n[exports.a]\npath = "a"\n', 2, "1 to 31 bytes"),
    ('[limits]\nmax_inflight = 0\n[exports.a]\npath = "a"\n', 2, "at least 1"),
    ('[server]\ntrace = true\n', None, "no exports"),
    ('[exports]\n', 1, "no exports"),
    ('[exports.a]\npath = "a"\n[tls]\nkey = "missing.key"\n', 4, "tls.key: "),
    ('[exports.a]\npath = "a"\n[tls]\n[[tls.client]]\nsubject = "CN=x"\nexport = "b"\n', 6, "no export is named 'b'"),
    ('[exports.a]\npath = "a"\n[tls]\n[[tls.client]]\nuid = 3\n', 4, "missing key 'subject'"),
    ('[exports.a]\npath = "a"\n[tls]\n[[tls.client]]\nsubject = "s"\n[[tls.client]]\nsubject = "s"\n', 7,
     "appears twice"),
])
def test_bad_values_name_their_line(dirs: Path, text: str, line: int | None, needle: str) -> None:
    e = fails(dirs, text)
    assert e.line == line and needle in str(e), str(e)


def test_lines_are_found_past_multiline_values(dirs: Path) -> None:
    """Text inside multi-line strings and arrays that looks like keys or tables is not taken for
    one: the error points at the real key."""
    e = fails(dirs, '''
        [server]
        tag = "t"
        [exports.a]
        path = "a"
        listeners = [
          # bogus = 1
        ]
        note = """
        bogus = 2
        [exports.a.policy]
        """
        bogus = 3
    ''')
    assert "exports.a.note: unknown key" in str(e) and e.line == 8


def test_listener_addresses_resolve_to_names(dirs: Path) -> None:
    cfg = parse(f'[listeners]\nl = "unix:/x"\n[exports.a]\npath = "{dirs}/a"\nlisteners = ["unix:/x"]\n')
    assert cfg.exports[0].listeners == frozenset({"l"})


def test_limits_are_the_numeric_session_options() -> None:
    known = limit_fields()
    assert known["max_fids"] is int and known["max_inflight"] is int and known["drain_seconds"] is float
    assert "max_msize" not in known and "trace" not in known and "readonly" not in known


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / "nope.toml"))
    assert "cannot read the exports file" in str(e.value)


def test_equal_configs_compare_equal_whatever_their_line(dirs: Path) -> None:
    """A reload keeps an export whose settings did not change even if it moved in the file."""
    one = parse(f'[exports.a]\npath = "{dirs}/a"\n')
    two = parse(f'# moved\n\n[exports.a]\npath = "{dirs}/a"\n')
    assert one.exports[0].line != two.exports[0].line and one.exports[0] == two.exports[0]
