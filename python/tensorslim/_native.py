"""Loads the native core tensorslim._C.

oneDNN's CPU engine in the pip wheel runs on the SYCL runtime, which finds its
OpenCL CPU device through the ICD loader; point the loader at the wheel's
libintelocl.so unless the user configured it already.
"""
import os

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

__all__ = ["_C"]
