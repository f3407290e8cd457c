"""Print oneDNN's include and library directories (from the onednn wheels).

Used by CMake at build time and by tensorslim at import time; a plain script so it
runs before tensorslim is importable. Output: "<include dir>;<lib dir>".
"""
import sys
from importlib import metadata
from pathlib import Path


def _find(dist_name: str, suffix: str) -> Path:
    dist = metadata.distribution(dist_name)
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f)).resolve()
    raise FileNotFoundError(f"{suffix} not in the {dist_name} package")


def onednn_dirs() -> tuple:
    header = _find("onednn-devel", "include/oneapi/dnnl/dnnl.hpp")
    lib = _find("onednn", "libdnnl.so.3")
    return header.parents[2], lib.parent


if __name__ == "__main__":
    try:
        inc, lib = onednn_dirs()
    except (metadata.PackageNotFoundError, FileNotFoundError) as e:
        print(e)
        sys.exit(1)
    print(f"{inc};{lib}")
