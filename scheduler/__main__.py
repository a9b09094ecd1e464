"""``python -m scheduler``: the scheduler daemon (same as ``briefs scheduler``)."""

import sys

from briefs.cli import main

sys.exit(main(["scheduler", *sys.argv[1:]]))
