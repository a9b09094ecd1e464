"""``python -m scheduler``: the scheduler daemon (same as ``briefs scheduler``)."""

import sys

from briefs.app.cli import main

sys.exit(main(["scheduler", *sys.argv[1:]]))
