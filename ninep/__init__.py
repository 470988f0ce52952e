"""ninep: a 9P file server (9P2000.L, 9P2000.u, 9P2000) for virtual machines and developers.

The request path is transport → codec → session → backend → host filesystem; each stage lives in
its own package or module (see ../shared/DESIGN.md).
"""

__version__ = "0.1.0"
