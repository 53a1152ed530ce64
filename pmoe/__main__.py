"""python -m pmoe: the command line (see pmoe.cli)."""
from .cli import main

raise SystemExit(main())
