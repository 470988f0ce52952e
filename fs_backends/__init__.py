"""Backends: everything that serves files. The 9P session and the FUSE mount are frontends over
the `Backend` protocol in `fs_backends.base`."""
