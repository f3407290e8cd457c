"""Loads the native core tensorslim._C.

Threads: the core runs its parallel regions on torch's OpenMP team when torch loaded one
(found in /proc/self/maps), so our kernels and torch's ops do not fight over cores.
TENSORSLIM_THREADS=own keeps the core's own pool instead.

oneDNN's CPU engine in the pip wheel runs on the SYCL runtime, which finds its
OpenCL CPU device through the ICD loader; point the loader at the wheel's
libintelocl.so unless the user configured it already.
"""
import os
import re

import torch  # noqa: F401  (its OpenMP runtime must be loaded before we look for it)

from ._onednn_paths import onednn_dirs


def _configure_opencl() -> None:
    if "OCL_ICD_FILENAMES" in os.environ:
        return
    try:
        _, lib_dir = onednn_dirs()
    except Exception:  # not installed from wheels: leave the system's configuration alone
        return
    icd = lib_dir / "libintelocl.so"
    if icd.exists():
        os.environ["OCL_ICD_FILENAMES"] = str(icd)


_configure_opencl()

try:
    from . import _C  # noqa: E402
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"tensorslim's native core failed to load ({e}). Reinstall with "
        "`pip install tensorslim` (it needs the onednn wheel beside it)."
    ) from e


_OPENMP_LIB = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")


def loaded_openmp_runtime() -> str:
    """Path of the OpenMP runtime already loaded in this process ('' if none)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if _OPENMP_LIB.search(path):
                    return path
    except OSError:
        pass
    return ""


def _configure_threads() -> None:
    choice = os.environ.get("TENSORSLIM_THREADS", "auto").lower()
    if choice not in ("auto", "own"):
        raise ValueError(f"TENSORSLIM_THREADS must be 'auto' or 'own', got {choice!r}")
    if choice == "auto":
        path = loaded_openmp_runtime()
        if path:
            _C.use_host_openmp(path)


_configure_threads()

__all__ = ["_C"]
