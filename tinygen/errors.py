"""The one exception type tinygen raises for bad input.

`TinygenError` subclasses `ValueError`, so callers that already catch
`ValueError` keep working; the command line turns it into one line on stderr
and exit code 2.
"""


class TinygenError(ValueError):
    """Bad input to tinygen: the message names the thing and what was expected."""
