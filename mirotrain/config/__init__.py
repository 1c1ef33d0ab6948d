"""Config loading, component registry and validation (see ``loader``, ``registry``, ``validation``)."""

from mirotrain.config.loader import ConfigError, apply_overrides, get_path, load_config, parse_value
from mirotrain.config.registry import instantiate, known_components, resolve_component

__all__ = [
    "ConfigError",
    "apply_overrides",
    "get_path",
    "instantiate",
    "known_components",
    "load_config",
    "parse_value",
    "resolve_component",
]
