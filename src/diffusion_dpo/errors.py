"""The one exception type for user mistakes (bad config, bad data, bad paths).

The command line prints a `UserError` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the file, row or key."""
