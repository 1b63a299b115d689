"""Every method module is imported here: the one place registration happens."""

from peftcli.methods import adalora, bitfit, ia3, lora  # noqa: F401
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
