"""briefs: each user's daily (or weekly) brief of their projects, delivered at their local time."""

__version__ = "0.1.0"
