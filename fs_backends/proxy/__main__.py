"""`python -m fs_backends.proxy --socket-fd N EXPORT ...`: the proxy helper (as `ninep proxy-helper`),
without importing the 9P server (helpers start faster)."""

from __future__ import annotations

import argparse

from fs_backends.proxy.helper import add_arguments, main_from_args

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="ninep proxy-helper")
    add_arguments(p)
    raise SystemExit(main_from_args(p.parse_args()))
