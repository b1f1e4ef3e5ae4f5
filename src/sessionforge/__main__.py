"""``python -m sessionforge``: the same command as the ``sessionforge`` script."""

from sessionforge.cli import main

raise SystemExit(main())
