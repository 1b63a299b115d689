"""Every method module is imported here: the one place registration happens."""

from peftcli.methods import adapter_fusion  # noqa: F401
from peftcli.methods import houlsby_adapter  # noqa: F401
from peftcli.methods import ladder_side_tuning  # noqa: F401
from peftcli.methods import lora  # noqa: F401
from peftcli.methods import parallel_adapter  # noqa: F401
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
