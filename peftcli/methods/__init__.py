"""Every method module is imported here: the one place registration happens (one line each)."""

from peftcli.methods import (
    adalora,  # noqa: F401
    adapter_fusion,  # noqa: F401
    bitfit,  # noqa: F401
    houlsby_adapter,  # noqa: F401
    ia3,  # noqa: F401
    ladder_side_tuning,  # noqa: F401
    lora,  # noqa: F401
    mam_adapter,  # noqa: F401
    p_tuning,  # noqa: F401
    parallel_adapter,  # noqa: F401
    prefix_tuning,  # noqa: F401
    prompt_tuning,  # noqa: F401
    unipelt,  # noqa: F401
)
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
