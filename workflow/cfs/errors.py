"""The errors a stage reports to its user without a traceback (cfs.cli.run_stage)."""


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


class SettingsError(ValueError):
    """A stage was handed settings it cannot use; the message names the key."""
