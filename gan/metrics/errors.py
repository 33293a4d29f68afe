"""The error every bad evaluation input raises: the message names the input and the fix."""
from gan.config import ConfigError


class MetricError(ConfigError):
    """A bad evaluation request (unknown metric, too few samples, missing weights, wrong run ...).
    A :class:`~gan.config.ConfigError`, so entry points that report config errors report it too."""
