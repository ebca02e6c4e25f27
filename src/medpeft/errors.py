"""Errors raised where a problem is known; the CLI turns them into one line and exit code 2."""


class MedpeftError(Exception):
    """Base class: a user-facing problem with the input (config, data, checkpoint, run directory)."""


class ConfigError(MedpeftError):
    """A configuration key or value is invalid."""


class DataError(MedpeftError):
    """A dataset file, row or image is missing or malformed."""


class CheckpointError(MedpeftError):
    """A checkpoint cannot be read or does not fit the backbone."""


class RunDirError(MedpeftError):
    """A run directory is missing, incomplete, complete already or from another config."""


class TrainingError(MedpeftError):
    """Training cannot go on (e.g. it diverged)."""


class ExportError(MedpeftError):
    """A run cannot be exported: the output folder is taken, or a format fails or differs from the run."""
