"""Errors a person can make or meet, each carrying one sentence that names the fix."""


class RumflowError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""


class ConfigError(RumflowError, ValueError):
    """The configuration or the command line asks for something impossible."""


class DataError(RumflowError):
    """A data folder is missing or malformed."""


class CheckpointError(RumflowError):
    """A checkpoint file is missing, truncated or does not match its digest."""


class DivergenceError(RumflowError, FloatingPointError):
    """A training or unlearning loss became non-finite or exploded; nothing was saved."""


class OutputError(RumflowError):
    """An output location cannot be written (a file where a folder should be, read-only, no permission)."""


class DiskFullError(OutputError):
    """A write failed because the disk is full; the file being written was removed, not left half-written."""


class RunFolderError(RumflowError):
    """A run folder is incomplete or does not match its manifest."""


class RunFolderBusy(RunFolderError):
    """Another live run holds the run folder."""
