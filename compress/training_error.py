"""The error that stops training: the loop cannot go on (a data stream whose batches do not fit a step, a
setting the student cannot take, too many non-finite steps in a row)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""
