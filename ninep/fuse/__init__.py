"""The FUSE frontend: a pyfuse3 filesystem over any Backend (a host directory, or a 9P server
through the remote backend).

A kernel request enters at `operations` (the pyfuse3 handlers, their errors mapped by `errors`),
which finds the backend Node of an inode through `nodes` over the table in `inodes`, converts
attributes with `attrs`, and lists directories with `readdir` (using the readdirplus workaround
in `compat`). `options` builds the mount options; the `ninep mount` command (`ninep.cli.mount`)
chooses the backend and mounts.

This package must never import `ninep.cli` or a concrete backend: it takes the Backend it is
given, through `fs_backends.base` alone.
"""
