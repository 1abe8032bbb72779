"""Exceptions that the CLI layer turns into one-line messages and exit codes.

`ConfigError` is a usage error (exit 2): a bad params value or option. Every other
`LraError` is a domain error (exit 1): a missing or mismatched artifact, bad data.
"""


class LraError(Exception):
    """A domain error: bad data or a missing / inconsistent artifact (exit code 1)."""


class ConfigError(LraError):
    """A usage error: a params.yaml value or option that is not valid (exit code 2)."""


class ArtifactError(LraError):
    """An upstream artifact is missing, or its schema, dimension or values are wrong."""
