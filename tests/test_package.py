"""The package surface outside the ops: list_ops names every op of the namespace, and an extension built against
another torch is refused at import with a message naming both versions."""
import os
import re
import subprocess
import sys

import torch

import peftcore
from peftcore.ops import list_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schemas():
    """The op names csrc/bindings.cpp defines in TORCH_LIBRARY(peftcore, m)."""
    src = open(os.path.join(ROOT, "csrc", "bindings.cpp")).read()
    block = src[src.index("TORCH_LIBRARY(peftcore, m)"):]
    block = block[:block.index("\n}\n")]
    return set(re.findall(r'm\.def\("([A-Za-z0-9_]+)\(', block))


def test_list_ops_is_every_schema():
    ops = list_ops()
    assert ops == sorted(set(ops))
    assert set(ops) == _schemas()
    for name in ("lora_multi_linear", "block_sparse_attn", "sparse_delta_linear", "partial_linear",
                 "monarch_matmul", "orthogonal_boft_apply", "miss_fold", "token_gather"):
        assert name in ops
    for name in ops:
        assert callable(getattr(torch.ops.peftcore, name)), name


def test_list_ops_before_any_lookup():
    """In a fresh process, list_ops names ops that dir(torch.ops.peftcore) does not show yet."""
    code = ("import torch, peftcore; from peftcore.ops import list_ops; "
            "print(len(list_ops()), len([n for n in dir(torch.ops.peftcore) if not n.startswith('_')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed, looked_up = map(int, out.stdout.split())
    assert listed == len(_schemas()) and looked_up < listed


def test_recorded_torch_version_is_the_extension_s():
    from peftcore import _build_torch
    assert _build_torch.TORCH_VERSION == peftcore._C.torch_version() == peftcore.build_info()["torch_built"]
    assert _build_torch.TORCH_VERSION == str(torch.__version__)


def test_import_with_another_torch_says_so():
    """A torch other than the one built against: ImportError naming both versions, before _C is loaded."""
    code = ("import sys, torch; torch.__version__ = '0.0.1+other'\n"
            "try:\n    import peftcore\nexcept ImportError as e:\n"
            "    print('loaded _C' if 'peftcore._C' in sys.modules else 'no _C'); print(e)\n"
            "else:\n    print('imported')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, msg = out.stdout.split("\n", 1)
    assert first == "no _C", out.stdout
    built = peftcore._C.torch_version()
    assert f"built against torch {built}, found torch 0.0.1+other" in msg
    assert "works only with the torch it was built against" in msg
    assert "scripts/setup.sh" in msg and f"torch=={built.split('+')[0]}" in msg
