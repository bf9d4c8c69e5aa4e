"""The one exception type for problems a user can fix.

`cli.py` catches it and prints its message as one line, so every message names the bad input
and what to do about it.
"""


class JaxsaeError(Exception):
  """A problem with the user's input, files or environment, with a message that says the fix."""
