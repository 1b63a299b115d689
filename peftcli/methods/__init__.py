"""Every method module is imported here: the one place registration happens (one line each)."""

from peftcli.methods import adalora  # noqa: F401
from peftcli.methods import adapter_fusion  # noqa: F401
from peftcli.methods import bitfit  # noqa: F401
from peftcli.methods import houlsby_adapter  # noqa: F401
from peftcli.methods import ia3  # noqa: F401
from peftcli.methods import ladder_side_tuning  # noqa: F401
from peftcli.methods import lora  # noqa: F401
from peftcli.methods import mam_adapter  # noqa: F401
from peftcli.methods import p_tuning  # noqa: F401
from peftcli.methods import parallel_adapter  # noqa: F401
from peftcli.methods import prefix_tuning  # noqa: F401
from peftcli.methods import prompt_tuning  # noqa: F401
from peftcli.methods import unipelt  # noqa: F401
from peftcli.methods.registry import Method, get_method_class, list_methods, register

__all__ = ["Method", "get_method_class", "list_methods", "register"]
