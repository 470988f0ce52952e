"""Builds the compiled ring extension (transports/_ring) from transports/ring/*.c.

Everything else about the package lives in pyproject.toml; setuptools needs this file only
because C extensions cannot be declared there.
"""
from glob import glob

from setuptools import Extension, setup

sources = sorted(glob("transports/ring/*.c"))
ext_modules = (
    [
        Extension(
            "transports._ring",
            sources=sources,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        )
    ]
    if sources
    else []
)

setup(ext_modules=ext_modules)
