"""`python -m casspec.bench {bench,profile} ...` (the same subcommands as `casspec bench/profile`)."""
from .cli import main

raise SystemExit(main())
