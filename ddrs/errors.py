"""Errors a user can act on. The CLI prints their message and exits with status 2."""


class DDRSError(Exception):
    """Base class: a clear, user-facing error (bad input, missing data, corrupt file)."""


class InputError(DDRSError, ValueError):
    """An argument or tensor is invalid (wrong shape, NaN, out of range, sigma <= 0, ...)."""


class DatasetError(DDRSError):
    """A dataset is unknown, missing or malformed on disk."""


class CheckpointError(DDRSError):
    """A checkpoint or model specification cannot be loaded or does not match."""


class ResultsFileError(DDRSError):
    """A results / sigmas TSV is malformed or incompatible with the requested run."""


class MemoryStoreError(DDRSError):
    """A certification memory is corrupt, belongs to another model, or is inconsistent."""


class TrainingError(DDRSError):
    """Training cannot go on (e.g. the loss became NaN); the last finished epoch is kept."""
