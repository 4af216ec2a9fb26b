"""``python -m sparsecraft``: the same as the ``sparsecraft`` command."""

from sparsecraft.cli import main

raise SystemExit(main())
