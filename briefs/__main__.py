"""``python -m briefs``: the ``briefs`` command."""

import sys

from briefs.app.cli import main

sys.exit(main())
