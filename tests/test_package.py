"""The package surface outside the ops: list_ops names every op of the namespace."""
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

