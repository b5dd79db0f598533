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


def test_only_bindings_uses_the_python_c_api():
    """_C is abi3 because csrc/bindings.cpp, compiled with Py_LIMITED_API, is the one file that includes Python.h
    (CMakeLists.txt sets the define on that file only); no file may pull in pybind11 or torch's Python headers."""
    python_h = re.compile(r'#\s*include\s*[<"](Python\.h|pybind11/|torch/extension\.h|torch/python\.h|'
                          r'torch/csrc/utils/pybind)')
    users = {}
    for d, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            with open(os.path.join(d, f), encoding="utf-8") as fh:
                hits = python_h.findall(fh.read())
            if hits:
                users[os.path.relpath(os.path.join(d, f), ROOT)] = hits
    assert users == {os.path.join("csrc", "bindings.cpp"): ["Python.h"]}
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as fh:
        assert 'csrc/bindings.cpp PROPERTIES COMPILE_DEFINITIONS "Py_LIMITED_API=0x03090000"' in fh.read()
    assert peftcore._C.__file__.endswith("_C.abi3.so"), peftcore._C.__file__


def _configure(tmp_path, env, *defines):
    cmake = os.path.join(os.path.dirname(sys.executable), "cmake")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PEFTCORE_")}, **env}
    return subprocess.run([cmake, "-S", ROOT, "-B", str(tmp_path / "b"), "-G", "Ninja",
                           f"-DPython_EXECUTABLE={sys.executable}", *defines],
                          capture_output=True, text=True, env=env, timeout=240)


def test_build_reads_the_environment(tmp_path):
    """PEFTCORE_CUDA / PEFTCORE_CUDA_ARCHS from the environment win over -D and over an earlier configure of the
    same build directory (the README's `PEFTCORE_CUDA_ARCHS=90 ... build_wheel.sh` relies on it)."""
    r = _configure(tmp_path, {}, "-DPEFTCORE_CUDA=OFF", "-DPEFTCORE_CUDA_ARCHS=80")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "peftcore: PEFTCORE_CUDA=OFF PEFTCORE_CUDA_ARCHS=80" in r.stdout
    r = _configure(tmp_path, {"PEFTCORE_CUDA": "OFF", "PEFTCORE_CUDA_ARCHS": "86;89"}, "-DPEFTCORE_CUDA_ARCHS=80")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "peftcore: PEFTCORE_CUDA=OFF PEFTCORE_CUDA_ARCHS=86;89" in r.stdout
    assert "peftcore: CUDA kernels OFF" in r.stdout
    r = _configure(tmp_path, {"PEFTCORE_CUDA": "maybe"})
    assert r.returncode != 0 and "PEFTCORE_CUDA must be AUTO, ON or OFF, got 'maybe'" in r.stdout + r.stderr
