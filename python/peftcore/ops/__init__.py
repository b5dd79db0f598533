"""Op families. Importing a family registers its fake kernels and autograd for ``torch.ops.peftcore``."""
from . import blockdiag  # noqa: F401
from . import lora  # noqa: F401
from . import miss  # noqa: F401
from . import orthogonal  # noqa: F401
from . import partial  # noqa: F401
from . import sparse_attn  # noqa: F401
from . import sparse_delta  # noqa: F401
from . import token_elim  # noqa: F401
