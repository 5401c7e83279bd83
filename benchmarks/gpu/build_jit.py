"""Last-resort build of cltrace._C with torch.utils.cpp_extension (ninja, no CMake), for when
both `pip install -e .` and the CMake build fail on a machine (e.g. torch's CMake config does
not find a CUDA component). Compiles csrc/*.cpp, csrc/cpu/*.cpp and, when torch has CUDA and
nvcc exists, csrc/cuda/*.cu, with the same definitions as CMakeLists.txt, and copies the
library to python/cltrace/ so that PYTHONPATH=python imports it.

    python benchmarks/gpu/build_jit.py [--build-dir /tmp/cltrace-jit]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sysconfig
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", default="/tmp/cltrace-jit")
    a = ap.parse_args()
    os.makedirs(a.build_dir, exist_ok=True)
    src = sorted(glob.glob(str(ROOT / "csrc" / "*.cpp")) + glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))
    cuda = bool(torch.version.cuda) and shutil.which("nvcc") is not None
    if cuda:
        src += sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    # ninja runs the command through a shell: the string's quotes must survive it
    defs = [f'-DCLTRACE_TORCH_CUDA=\\"{torch.version.cuda or ""}\\"'] + (["-DCLTRACE_WITH_CUDA=1"] if cuda else [])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    print(f"building {len(src)} sources (CUDA {cuda}) in {a.build_dir}", flush=True)
    cpp_extension.load(
        name="_C", sources=src, build_directory=a.build_dir, is_python_module=False,
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O3", "-fopenmp", *defs], extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", *defs], with_cuda=cuda, verbose=True)
    lib = Path(a.build_dir) / "_C.so"
    dest = ROOT / "python" / "cltrace" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copy2(lib, dest)
    print(f"copied {lib} -> {dest}")


if __name__ == "__main__":
    main()
