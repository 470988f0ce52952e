"""The `ninep` command: the only composition root. Argument parsing, exit codes, `SystemExit`,
confinement of the server process, typed backend specs, the exports file and its reloader, and every
subcommand (serve, mount, stats/top, check-config, xenstore-emu, the proxy helper).

Nothing outside this package imports it.
"""
