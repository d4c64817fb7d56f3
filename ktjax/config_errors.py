"""The error config.json parsing raises (its own module so that `ktjax.config` and
`ktjax.quantization_config` both raise it without importing each other)."""


class ConfigError(ValueError):
    """A config.json field ktjax cannot run; the message names the field."""
