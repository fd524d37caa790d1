"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths)."""


class ConfigError(ValueError):
    """A user error: the message names the bad value and the fix.

    The CLI prints it as one line and exits with code 2, without a traceback.
    """

    last: "ConfigError | None" = None

    def __init__(self, *args):
        super().__init__(*args)
        # jsonargparse reports errors of Union-typed arguments (e.g. trainer.strategy) as the text of each
        # alternative's error, dropping the exception itself; the CLI finds it again through this.
        ConfigError.last = self


class TrainingDiverged(ConfigError):
    """The loss went NaN/inf: a setting to change (learning rate, data, precision), reported like one."""


def did_you_mean(value: str, choices) -> str:
    """A short hint naming the closest valid choices, for error messages."""
    import difflib

    choices = list(dict.fromkeys(str(c) for c in choices))  # each once
    close = difflib.get_close_matches(str(value), choices, n=3)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    shown = ", ".join(repr(c) for c in choices[:12])
    return f"choose from {shown}{', ...' if len(choices) > 12 else ''}"
