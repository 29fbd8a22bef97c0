"""``python -m medprompt``: the same command as the ``medprompt`` console script."""

from medprompt.cli import main

raise SystemExit(main())
