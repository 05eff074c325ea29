"""`python -c "from modkd.store import CacheError"`: the one error raised for a bad or incomplete cache.

Every message names the shard or file and says what is wrong with it, so nobody has to read a
pyarrow traceback to learn that a shard was truncated.
"""


class CacheError(Exception):
    """A cache on disk is incomplete, corrupt or inconsistent with its manifest."""
