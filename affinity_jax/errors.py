"""The one exception type users see.

Every check on user input (paths, files, configs, weights) raises `UserError`
with a one-line message that names the file or key and what is wrong.
`affinity_jax.main` prints it as `error: <message>` and exits with status 2,
without a traceback.
"""


class UserError(Exception):
  """A problem with the user's input, stated in one line."""
