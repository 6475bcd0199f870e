"""`python -m xti` runs the command line interface."""

from xti.cli import main

raise SystemExit(main())
