"""The one exception type users see: a message that names the file, line or field at fault."""


class KftuneError(Exception):
    """Bad input or configuration. The CLI prints the message alone, without a traceback."""
