"""Every method module is imported here: the one place registration happens."""

from peftcli.methods import lora  # noqa: F401
from peftcli.methods import p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (soft prompts, issue 5)
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
