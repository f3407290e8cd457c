"""--isa avx2|avx2_vnni|avx512 for the benchmarks: caps our kernels *and* the baseline (torch's
ATen and MKL, oneDNN, and fbgemm, which runs torch's quantize_dynamic) at one ISA, so an AVX-512
machine can measure what an AVX2-only CPU gets. avx2_vnni is AVX2 plus AVX-VNNI's 256-bit
vpdpbusd (Intel from Alder Lake on): our AVX2 kernels take it (on an AVX-512 CPU its EVEX form
stands in), oneDNN and MKL are capped at their AVX2 + AVX-VNNI levels (which fall back to AVX2
where the CPU lacks AVX-VNNI, as on AMD Zen 4), fbgemm at AVX2 (it has no AVX-VNNI level). ONNX
Runtime has no such switch: its kernels keep the machine's best ISA.

The caps are environment variables those libraries read when they load, so a benchmark
calls cap_from_argv() before it imports torch or tensorslim, then add_argument(parser)
(for --help) and check(args) after parsing (which says whether the cap took effect).
"""
import os
import sys

CHOICES = ("avx2", "avx2_vnni", "avx512")
_AVX2 = {"TENSORSLIM_ISA": "avx2", "TENSORSLIM_AVX2_VNNI": "0", "ONEDNN_MAX_CPU_ISA": "AVX2",
         "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
_ENV = {
    "avx2": _AVX2,
    "avx2_vnni": dict(_AVX2, TENSORSLIM_AVX2_VNNI="1", ONEDNN_MAX_CPU_ISA="AVX2_VNNI",
                      MKL_ENABLE_INSTRUCTIONS="AVX2_E1"),
    "avx512": {},  # the machine as it is
}


def _requested(argv):
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
    return None


def cap_from_argv(argv=None):
    isa = _requested(sys.argv[1:] if argv is None else argv)
    if isa in _ENV:
        os.environ.update(_ENV[isa])


def add_argument(parser):
    parser.add_argument("--isa", choices=CHOICES, default=None,
                        help="cap our kernels and torch/MKL/oneDNN/fbgemm at this ISA (default: the best here)")


def check(args):
    """Exits with a message when the requested ISA is not what runs; returns a line to print."""
    import torch

    import tensorslim as ts

    active, kernels = ts._C.active_isa(), ts._C.kernel_isa()
    want_vnni = args.isa == "avx2_vnni"
    if args.isa and (active != args.isa.split("_")[0] or want_vnni != (ts._C.avx2_vnni() != "none")):
        sys.exit(f"--isa {args.isa}: this machine runs {kernels} (best {ts._C.best_isa()})")
    return f"tensorslim ISA {kernels} (best {ts._C.best_isa()}), torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
