"""The error every config check raises (its own module so ``qpf.ops`` can raise it without
importing ``qpf.config``, which imports ``qpf.ops``)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""
