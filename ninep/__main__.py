"""`python -m ninep` is the `ninep` command."""

from ninep.cli import main

raise SystemExit(main())
