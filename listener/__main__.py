"""`python -m listener` is the same as the `token-reset` console script."""

from listener.cli import main

raise SystemExit(main())
