"""Every method module is imported here: the one place registration happens."""

from peftcli.methods import (  # noqa: F401
    adapter_fusion,
    houlsby_adapter,
    ladder_side_tuning,
    lora,
    mam_adapter,
    p_tuning,
    parallel_adapter,
    prefix_tuning,
    prompt_tuning,
    unipelt,
)
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
