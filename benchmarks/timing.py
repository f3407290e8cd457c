"""Timing helpers shared by the benchmarks (run as scripts, so this folder is on sys.path)."""
import platform
import random
import statistics
import time

import torch


def timeit(fn, min_time=0.4, warmup=3, clock=time.perf_counter):
    """Median seconds per call of fn (at least 5 calls and min_time of wall clock).
    clock=time.thread_time measures the calling thread's CPU time instead."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def median_times(fns, min_time=1.0, warmup=3, min_rounds=9):
    """Median seconds per call of each fn, timed in interleaved rounds (one call of each
    per round) so that load from other processes affects baseline and ours alike. Each round
    runs them in a new (seeded) random order: in a fixed order a function always meets the
    caches and threads its predecessor left, which moved identical code by 13% (a digits
    ResNet at batch 32, docs/benchmarks.md, eleventh session)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    runs = [[] for _ in fns]
    order = list(range(len(fns)))
    rng = random.Random(0)
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(runs[0]) < min_rounds:
        rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            runs[i].append(time.perf_counter() - t0)
    return [statistics.median(r) for r in runs]


def copy_bandwidth(nbytes=256 << 20):
    """Bytes read + written per second by a large tensor copy (256 MiB: memory, not cache). The
    benchmarks' %bw divides by it, so weights small enough to stay in cache between calls (under
    the L3, e.g. MiniLM-sized layers) read above 100%: %bw speaks for weights read from memory."""
    a = torch.empty(nbytes // 4)
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), min_time=0.5)
    return 2 * nbytes / t


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(isa_line: str) -> str:
    """The CPU, both thread pools and the ISA line a benchmark's table is read against."""
    import tensorslim as ts

    return (f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, {ts._C.num_threads()} "
            f"tensorslim threads ({ts._C.threading_backend()}); {isa_line}")


def parse_shapes_and_recipes(parser, shapes: str, recipes: dict, default_recipes: str):
    """(args, recipe names) of a model benchmark timed over batch x tokens shapes: adds --shapes,
    --recipes and --isa to `parser`, parses, checks the ISA cap and the recipe names, and prints
    the machine line."""
    from isa_option import add_argument, check

    parser.add_argument("--shapes", default=shapes, help="batch x tokens, comma separated")
    parser.add_argument("--recipes", default=default_recipes)
    add_argument(parser)
    args = parser.parse_args()
    isa_line = check(args)
    names = recipe_names(parser, args.recipes, recipes)
    print(machine_line(isa_line))
    return args, names


def recipe_names(parser, text: str, known) -> list:
    """The comma-separated --recipes, each one of `known` (else the parser's error)."""
    names = text.split(",")
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; choose from {sorted(known)}")
    return names


def batch_tokens(text: str) -> list:
    """'1x32,8x128' -> [('1x32', 1, 32), ('8x128', 8, 128)]."""
    out = []
    for shape in text.split(","):
        b, t = (int(v) for v in shape.split("x"))
        out.append((shape, b, t))
    return out


def compressed_copies(dense, recipes: dict, names: list, calib) -> dict:
    """{name: a copy of `dense` compressed by recipes[name](model, calib)}."""
    import copy

    models = {}
    for name in names:
        models[name] = copy.deepcopy(dense)
        recipes[name](models[name], calib)
    return models


def print_header(header: str) -> None:
    print(header)
    print("-" * len(header))
