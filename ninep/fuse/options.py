"""The mount options a FUSE mount of ninep is made with.

This module must never mount anything or read the command line: it only builds the option set.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyfuse3


def mount_options(
    fsname: str, *, readonly: bool = False, extra: Sequence[str] = (), debug: bool = False
) -> set[str]:
    """The option set given to pyfuse3.init: default_permissions (the kernel checks modes, as a 9P
    client does), fsname/subtype for df and mount(8), plus what the user passed with -o."""
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={fsname.replace(',', '_')}")
    opts.add("subtype=ninep")
    if readonly:
        opts.add("ro")
    for o in extra:
        if o:
            opts.add(o)
    if debug:
        opts.add("debug")
    return opts
