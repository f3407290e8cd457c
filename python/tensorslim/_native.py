"""Loads the native core tensorslim._C.

Threads: the core runs its parallel regions on torch's OpenMP team when torch loaded one
(found in /proc/self/maps), so kernels and torch ops share one set of threads. With a pool
of its own, torch's team keeps spinning after each torch op on the cores our workers need:
MiniLM with dynamic INT8 ran 0.88x fp32 that way and 1.21x on the shared team (AVX2,
docs/benchmarks.md). Forked children fall back to the own pool (libgomp's team does not
survive fork). TENSORSLIM_THREADS=own keeps the own pool (TENSORSLIM_NUM_THREADS threads,
the default when that is set): it degrades less on an oversubscribed machine, where
libgomp's spinning barrier collapses (0.5 ms -> 8 ms per call measured under load).

oneDNN's CPU engine in the pip wheel runs on the SYCL runtime, which finds its
OpenCL CPU device through the ICD loader; point the loader at the wheel's
libintelocl.so unless the user configured it already.
"""
import os
import re
import warnings

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
        "`pip install tensorslim` (on x86-64 it needs the onednn wheel beside it)."
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
    default = "own" if "TENSORSLIM_NUM_THREADS" in os.environ else "auto"
    choice = os.environ.get("TENSORSLIM_THREADS", default).lower()
    if choice not in ("auto", "own", "openmp"):
        raise ValueError(f"TENSORSLIM_THREADS must be 'auto', 'own' or 'openmp', got {choice!r}")
    if choice == "own":
        return
    path = loaded_openmp_runtime()
    if choice == "auto":  # the shared team where there is one, else the own pool
        if path:
            _C.use_host_openmp(path)
        return
    if not path:
        raise ValueError("TENSORSLIM_THREADS=openmp: no OpenMP runtime is loaded in this process")
    if not _C.use_host_openmp(path):
        raise ValueError(f"TENSORSLIM_THREADS=openmp: {path} lacks the GOMP entry points")


def _check_thread_count() -> None:
    """The core clamps its pool to the CPUs this process may use; say so when asked for more."""
    raw = os.environ.get("TENSORSLIM_NUM_THREADS")
    if raw is None:
        return
    cpus = len(os.sched_getaffinity(0))
    if not raw.strip().isdigit() or int(raw) < 1:
        warnings.warn(f"TENSORSLIM_NUM_THREADS={raw!r} is not a positive integer; using {cpus} "
                      "threads (the CPUs this process may use)", RuntimeWarning, stacklevel=3)
    elif int(raw) > cpus:
        warnings.warn(f"TENSORSLIM_NUM_THREADS={raw} exceeds the {cpus} CPUs this process may use; "
                      f"using {cpus} threads", RuntimeWarning, stacklevel=3)


_configure_threads()
_check_thread_count()

__all__ = ["_C"]
