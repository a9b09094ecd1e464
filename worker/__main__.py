"""``python -m worker``: a queue worker (same as ``briefs worker``)."""

import sys

from briefs.app.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
