"""Op families. Importing a family registers its fake kernels and autograd for ``torch.ops.peftcore``."""
import torch

from . import blockdiag  # noqa: F401
from . import lora  # noqa: F401
from . import miss  # noqa: F401
from . import orthogonal  # noqa: F401
from . import partial  # noqa: F401
from . import sparse_attn  # noqa: F401
from . import sparse_delta  # noqa: F401
from . import token_elim  # noqa: F401


def list_ops() -> list:
    """The sorted names of every op in the ``torch.ops.peftcore`` namespace.

    Read from the dispatcher's registry, so it names every op the extension defines, not only the ones already
    looked up (``dir(torch.ops.peftcore)`` shows only those). Each name ``n`` is callable as
    ``getattr(torch.ops.peftcore, n)``.
    """
    names = set()
    for qualname in torch._C._dispatch_get_all_op_names():  # "ns::name" or "ns::name.overload"
        ns, sep, rest = qualname.partition("::")
        if sep and ns == "peftcore":
            names.add(rest.partition(".")[0])
    return sorted(names)
