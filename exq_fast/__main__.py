"""``python -m exq_fast`` runs the ``exq-fast`` command."""

from .cli import main

raise SystemExit(main())
