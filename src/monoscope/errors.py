"""User-facing errors.

Anything a user can cause (bad id, bad path, wrong shapes) raises `MonoscopeError` with a one-line message
that says what to do; the CLI prints it without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class MonoscopeError(Exception):
    """An error caused by input the user can fix; its message is shown as is."""
