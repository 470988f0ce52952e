"""ninep: a 9P file server (9P2000.L, 9P2000.u, 9P2000) for virtual machines and developers.

A request passes transport (`transports/`) → wire (`ninep.protocol`) → server (`ninep.server`:
session, fid table, handlers) → backend (`fs_backends/`) → host filesystem. `ninep.cli` is the
only place those parts are put together; `ninep.fuse` is the other frontend, `ninep.client` the
9P client, `ninep.metrics` the counters and their endpoints.
"""

__version__ = "0.1.0"
