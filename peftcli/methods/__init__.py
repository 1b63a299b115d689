"""Every method module is imported here: the one place registration happens."""

from peftcli.methods import (
    adapter_fusion,  # noqa: F401
    houlsby_adapter,  # noqa: F401
    ladder_side_tuning,  # noqa: F401
    lora,  # noqa: F401
    parallel_adapter,  # noqa: F401
)
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
