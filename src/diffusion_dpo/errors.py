"""The one exception type for user mistakes (bad config, bad data, bad paths), and the rule that tells a
mistyped local path from a hub id.

The command line prints a `UserError` as a single line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line naming the file, row or key."""


def is_local_path(spec: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when `spec` can only mean a local path (so, if missing, it is a typo, not a hub id): it starts
    with '.', '/' or '~', has more than one '/' or a backslash (hub ids are 'name' or 'owner/name'), or
    ends with one of `suffixes` (file types a hub repo id never has)."""
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or (bool(suffixes) and spec.lower().endswith(tuple(s.lower() for s in suffixes))))
