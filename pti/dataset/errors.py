"""The dataset room's error type."""


class DatasetError(ValueError):
    """A dataset or trigger-word problem, one line naming what to change."""
