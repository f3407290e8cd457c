"""The `tensorslim` command: what this install can do, and what a saved file holds.

    tensorslim info                 version, CPU paths, threads, CUDA, formats
    tensorslim inspect FILE         the layers of a file written by ts.save
    tensorslim compress RECIPE --out FILE [--model module:callable] [--weights W.safetensors]
                                    apply a recipe's steps (prune, factorize, quantize) and save
    tensorslim bench [NAME ...] [--list] [-- ARGS]
                                    run the benchmarks of a source checkout (benchmarks/bench_*.py)
"""
import argparse
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from . import __version__


def _info(_args) -> int:
    import torch

    import tensorslim as ts
    from tensorslim._native import _C

    cuda = "not built"
    if _C.has_cuda:
        cuda = f"built, {_C.cuda_device_count()} device(s) visible"
    print(f"tensorslim {ts.__version__} (torch {torch.__version__})")
    print(f"CPU kernels: best ISA {_C.best_isa()}{' + AVX-VNNI' if _C.cpu_has_avx_vnni() else ''}, "
          f"active {_C.kernel_isa()}, {_C.num_threads()} threads")
    print(f"oneDNN: {'linked' if _C.built_with_onednn() else 'not in this build (its fallbacks run)'}")
    print(f"CUDA kernels: {cuda}")
    print(_int8_line())
    print("formats: " + ", ".join(sorted(ts.FORMATS)))
    return 0


def _int8_line() -> str:
    """What INT8-activation recipes do on this CPU (docs/w8a8.md, docs/conv.md)."""
    from tensorslim.ops import torch_onednn

    if torch_onednn.default_weight_qmax(4096, 4096) == 64:
        return ("INT8 activations: no VNNI / AMX (oneDNN sums pairs of products in int16 here), so "
                "W8A8 / Int8Dynamic linears default to weight codes in [-64, 64], convs to 7-bit activations")
    return "INT8 activations: full-range codes (oneDNN's INT8 kernels are exact here, or ours run)"


def _inspect(args) -> int:
    from tensorslim.io import read_header, tensor_shapes

    header = read_header(args.file)
    sizes = tensor_shapes(args.file)
    total = 0
    for dtype, shape in sizes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * _dtype_bytes(dtype)
    print(f"{args.file}: tensorslim format v{header['version']}, written by tensorslim "
          f"{header['written_by']}, {len(sizes)} tensors, {total / 2**20:.2f} MiB")
    print(f"{'layer':<48} {'kind':<22} {'format':<14} {'group':>6} {'shape [out, in]':>16}")
    for name, spec in sorted(header["layers"].items()):
        shape = f"[{spec.get('out_features')}, {spec.get('in_features')}]"
        print(f"{name:<48} {str(spec.get('kind', '?')):<22} {str(spec.get('format', '-')):<14} "
              f"{str(spec.get('group_size', '-')):>6} {shape:>16}")
    if header["aliases"]:
        print(f"tied tensors stored once: {len(header['aliases'])}")
    _print_pruning(args.file, header.get("pruning") or {})
    return 0


def _print_pruning(path: str, pruning: dict) -> None:
    """The pruning a file records (the layers stay float, so the table above has no rows for them)."""
    masked = pruning.get("masks") or []
    if masked:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys, rows = set(f.keys()), []
            for name in sorted(masked):
                key = f"{name}.weight_mask" if name else "weight_mask"
                share = f" {1 - float(f.get_tensor(key).float().mean()):.1%}" if key in keys else ""
                rows.append(f"{name}{share}")
        print(f"pruning masks (dense weights, zeros kept by the masks): {', '.join(rows)}")
    for name, attrs in sorted((pruning.get("structured") or {}).items()):
        sizes = ", ".join(f"{a}={v}" for a, v in sorted(attrs.items()))
        print(f"channels removed: {name} ({sizes or 'resized'})")


def _compress(args) -> int:
    from tensorslim.recipe import run

    sizes = run(args.recipe, args.out, args.model, args.weights)
    print(f"{args.out}: {sizes['bytes_before'] / 2**20:.2f} MiB -> {sizes['bytes_after'] / 2**20:.2f} MiB "
          f"({sizes['bytes_after'] / max(sizes['bytes_before'], 1):.3f}x)")
    return 0


# bench_cuda needs a GPU and its own build; `tensorslim bench cuda` still runs it by name.
_DEFAULT_SKIP = ("cuda",)


def _benchmarks(directory: Optional[str]) -> Dict[str, Path]:
    """{name: script} of bench_<name>.py in `directory`, or in the checkout this package runs
    from (the benchmarks are not part of an installed wheel)."""
    root = Path(directory) if directory else Path(__file__).resolve().parents[2] / "benchmarks"
    found = {p.stem[len("bench_"):]: p for p in sorted(root.glob("bench_*.py"))}
    if not found:
        raise ValueError(f"no benchmarks in {root}: they ship with the source tree; run from a "
                         "checkout or pass --dir")
    return found


def _bench(args) -> int:
    found = _benchmarks(args.dir)
    if args.list:
        print("\n".join(found))
        return 0
    unknown = [n for n in args.names if n not in found]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {sorted(found)}")
    names = args.names or [n for n in found if n not in _DEFAULT_SKIP]
    failed = []
    for name in names:
        print(f"== bench_{name}", flush=True)
        if subprocess.run([sys.executable, str(found[name]), *args.extra]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"tensorslim bench: failed: {failed}", file=sys.stderr)
        return 1
    return 0


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _dtype_bytes(name: str) -> int:
    return _DTYPE_BYTES.get(name, 1)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorslim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tensorslim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, CPU/CUDA kernels, formats").set_defaults(run=_info)
    p = sub.add_parser("inspect", help="layers of a file written by ts.save")
    p.add_argument("file")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("compress", help="apply a recipe (YAML/JSON) to a model and save it")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="the compressed safetensors file to write")
    p.add_argument("--model", help="module.path:callable that builds the model (overrides the recipe)")
    p.add_argument("--weights", help="the model's float weights, a safetensors file (overrides the recipe)")
    p.set_defaults(run=_compress)
    p = sub.add_parser("bench", help="run the bundled benchmarks and print their tables")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all but cuda)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--dir", help="the benchmarks directory (default: the checkout's benchmarks/)")
    p.set_defaults(run=_bench, extra=[])
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = parser.parse_args(argv)
    args.extra = extra
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:  # bad input (io: a missing / corrupt file): one line, no traceback
        msg = str(e)
        if args.command == "compress" and "calib_data" in msg:
            msg += " (in a recipe: calib: module.path:callable returning the batches)"
        print(f"tensorslim {args.command}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
