"""The one error type of training that means "the user can fix this": shown as one line, without a traceback."""


class TrainingError(RuntimeError):
    """A bad flag, a missing package, an unusable checkpoint, a diverged run."""
