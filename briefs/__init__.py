"""briefs: each user's daily (or weekly) brief of their projects, delivered at their local time."""

import zoneinfo

__version__ = "0.1.0"

# Timezone rules come from the pinned ``tzdata`` package, never from the host's
# /usr/share/zoneinfo, so every machine plans the same instants.
zoneinfo.reset_tzpath(to=[])
