"""Moved to tests/helpers.py (one helpers module); this name re-exports it for test files
that still import _paged_helpers, until they move."""
from helpers import *  # noqa: F401,F403
