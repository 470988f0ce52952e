"""`python -m ninep` is the `ninep` command."""

from ninep.cli.main import main

raise SystemExit(main())
