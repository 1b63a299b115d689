"""Every method module is imported here: the one place registration happens."""

from peftcli.methods import (  # noqa: F401
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
