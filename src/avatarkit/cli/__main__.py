"""``python -m avatarkit.cli``: the same as the ``avatarkit`` command."""

from . import main

raise SystemExit(main())
