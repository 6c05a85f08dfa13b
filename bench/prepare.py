"""BPE corpus preparation speed and memory: gptlab.data.prepare.prepare_corpus with tiktoken gpt2.

For every size a corpus is built by repeating tiny Shakespeare into a temporary directory (--tmp,
default /tmp; MB = 10^6 bytes throughout). Every (size, workers) run prepares it into an empty cache
directory in a fresh Python subprocess, so that the peak RSS belongs to that run alone. With N > 1
workers prepare_corpus forks N encoding processes; "peak RSS" is then the run's whole footprint,
counted pessimistically as the driver process's VmHWM plus N times the largest worker's ru_maxrss
(pages the workers share copy-on-write with their parent are counted once per process). The child loads the gpt2 encoding
before starting the clock (its load time is reported separately), so `time` is prepare_corpus
itself: hashing the corpus, the character-count pass, the tokenizing pass and writing the token files.
The corpus was just written, so it is read from the page cache.

`workers=1` encodes in the driver process, one tiktoken call at a time: the single-threaded tiktoken
rate; speedup = time(1 worker) / time(N workers). Runs alternate the order from repeat to repeat. Temporary files are removed at the end
(also on errors and Ctrl-C) unless --keep.

    python bench/prepare.py                                   # 10, 100, 1000 MB x 1, 2 workers
    python bench/prepare.py --sizes 1 --workers 1             # smoke test

Writes bench/results/prepare.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB (10^6 bytes), comma-separated")
    p.add_argument("--workers", default="1,2", help="prepare_corpus(workers=...) values to compare, comma-separated")
    p.add_argument("--repeats", type=int, default=1, help="runs per (size, workers) (default: %(default)s)")
    p.add_argument("--encoding", default="gpt2", help="tiktoken encoding (default: %(default)s)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary directory goes (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/prepare.json)")
    p.add_argument("--child", nargs=4, metavar=("CORPUS", "OUT_ROOT", "THREADS", "ENCODING"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- inside the subprocess ----------------------------------------------------------------------------
def proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds() -> float:
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def child(corpus: str, out_root: str, workers: str, encoding: str) -> None:
    import tiktoken

    from gptlab.data.prepare import prepare_corpus

    t0 = time.perf_counter()
    tiktoken.get_encoding(encoding)  # cached by tiktoken: prepare_corpus gets this object
    encoding_load_s = time.perf_counter() - t0
    base_rss_kb = proc_status_kb("VmRSS")
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    prepared = prepare_corpus(
        [Path(corpus)], {"kind": "bpe", "encoding": encoding}, Path(out_root),
        workers=int(workers), log=lambda *a, **k: None,
    )
    dt = time.perf_counter() - t0
    result = {
        "time_s": dt,
        "encoding_load_s": encoding_load_s,
        "bytes": prepared.meta["corpus"]["bytes"],
        "chars": prepared.meta["corpus"]["chars"],
        "tokens": sum(prepared.meta["tokens"].values()),
        "tokens_split": prepared.meta["tokens"],
        "base_rss_kb": base_rss_kb,
        "vmhwm_kb": proc_status_kb("VmHWM"),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # kB on Linux
        "workers_max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,  # largest worker
        "cpu_s": cpu_seconds() - cpu0,  # this process and its (joined) workers
    }
    workers = int(workers)
    result["total_peak_kb"] = result["vmhwm_kb"] + (workers * result["workers_max_rss_kb"] if workers > 1 else 0)
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver -------------------------------------------------------------------------------------
def build_corpus(path: Path, size_bytes: int) -> None:
    src = C.SHAKESPEARE.read_bytes()
    block = src * max(1, (8 << 20) // len(src))  # ~8 MB of whole copies
    left = size_bytes
    with open(path, "wb") as f:
        while left > 0:
            piece = block[:left]
            f.write(piece)
            left -= len(piece)
    # tiny Shakespeare is ASCII, so a cut anywhere is still valid UTF-8


def run_child(corpus: Path, out_root: Path, workers: int, encoding: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(corpus), str(out_root), str(workers), encoding]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"prepare subprocess failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["subprocess_wall_s"] = wall
    return res


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return None
    sizes = C.float_list(args.sizes)
    workers_list = C.int_list(args.workers)
    info = C.machine_info(torch_too=False)
    try:
        import tiktoken

        info["tiktoken"] = tiktoken.__version__
    except ImportError:
        pass
    print(f"[bench] {C.machine_line(info)}")
    print(f"[bench] prepare_corpus(bpe {args.encoding}) on tiny Shakespeare repeated to {sizes} MB, "
          f"workers {workers_list}, {args.repeats} repeat(s); one subprocess per run")
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gptlab-bench-prepare-", dir=args.tmp))
    runs = []
    try:
        for size in sizes:
            size_bytes = int(size * 1e6)
            free = shutil.disk_usage(work).free
            if free < 2 * size_bytes + (100 << 20):
                raise SystemExit(f"not enough space in {work}: {free / 1e6:.0f} MB free, need about "
                                 f"{2 * size_bytes / 1e6:.0f} MB for {size:g} MB (use --tmp)")
            corpus = work / f"corpus-{size:g}MB.txt"
            t0 = time.perf_counter()
            build_corpus(corpus, size_bytes)
            print(f"[bench] built {corpus.name} ({size_bytes:,} bytes) in {time.perf_counter() - t0:.1f}s", flush=True)
            for rep in range(args.repeats):
                order = workers_list if rep % 2 == 0 else workers_list[::-1]
                for workers in order:
                    out_root = work / f"prepared-{size:g}MB-t{workers}-r{rep}"
                    try:
                        res = run_child(corpus, out_root, workers, args.encoding)
                    finally:
                        shutil.rmtree(out_root, ignore_errors=True)
                    res.update(size_mb=size, workers=workers, repeat=rep,
                               mb_per_s=res["bytes"] / 1e6 / res["time_s"],
                               peak_rss_mb=res["total_peak_kb"] * 1024 / 1e6)
                    runs.append(res)
                    print(f"[bench]   {size:g} MB, {workers} worker(s): {res['time_s']:.2f}s, "
                          f"{res['mb_per_s']:.2f} MB/s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
            corpus.unlink()
    finally:
        if args.keep:
            print(f"[bench] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # medians per (size, workers)
    cells = {}
    for size in sizes:
        for workers in workers_list:
            rs = [r for r in runs if r["size_mb"] == size and r["workers"] == workers]
            t = statistics.median(r["time_s"] for r in rs)
            cells[(size, workers)] = {
                "size_mb": size,
                "workers": workers,
                "time_s": t,
                "times_s": [r["time_s"] for r in rs],
                "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                "mb_per_s": rs[0]["bytes"] / 1e6 / t,
                "tokens": rs[0]["tokens"],
                "tokens_per_s": rs[0]["tokens"] / t,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "base_rss_mb": rs[0]["base_rss_kb"] * 1024 / 1e6 if rs[0]["base_rss_kb"] else None,
                "encoding_load_s": statistics.median(r["encoding_load_s"] for r in rs),
                "subprocess_wall_s": statistics.median(r["subprocess_wall_s"] for r in rs),
            }
    rows = [
        [f"{c['size_mb']:g}", c["workers"], f"{c['time_s']:.2f}", f"{c['cpu_s']:.2f}", f"{c['mb_per_s']:.2f}", f"{c['tokens']:,}",
         f"{c['tokens_per_s']:,.0f}", f"{c['peak_rss_mb']:.0f}", f"{c['base_rss_mb']:.0f}"]
        for c in cells.values()
    ]
    print()
    print(C.table(["size MB", "workers", "time s", "CPU s", "MB/s", "tokens", "tokens/s", "peak RSS MB",
                   "RSS before MB"], rows))
    print("(CPU s = user + system time of the run and its workers; RSS before = after imports and loading "
          "the encoding; MB = 10^6 bytes)")

    # speedup of each worker count over the first (normally 1)
    t_ref = workers_list[0]
    speedups = []
    if len(workers_list) > 1:
        srows = []
        for size in sizes:
            for workers in workers_list[1:]:
                s = cells[(size, t_ref)]["time_s"] / cells[(size, workers)]["time_s"]
                # CPU time for the same work: > 1 when cores slow each other down (shared caches, SMT,
                # host contention), which no software split of the work can win back
                cpu = cells[(size, workers)]["cpu_s"] / cells[(size, t_ref)]["cpu_s"]
                speedups.append({"size_mb": size, "workers": workers, "vs_workers": t_ref, "speedup": s,
                                 "cpu_ratio": cpu})
                srows.append([f"{size:g}", f"{t_ref} -> {workers}", f"{s:.2f}x", f"{cpu:.2f}x"])
        print()
        print(C.table(["size MB", "workers", "speedup", "CPU time for the same work"], srows))

    # goals
    goals = {}
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        lin = {t: (cells[(large, t)]["time_s"] / large) / (cells[(small, t)]["time_s"] / small) for t in workers_list}
        goals["linear_time"] = {
            "seconds_per_mb_ratio_largest_vs_smallest": lin,
            "met": all(0.85 <= v <= 1.15 for v in lin.values()),
            "rule": "s/MB at the largest size within 15% of s/MB at the smallest",
        }
    large = max(sizes)
    peak = max(cells[(large, t)]["peak_rss_mb"] for t in workers_list)
    goals["peak_rss_below_1GB_at_largest"] = {"size_mb": large, "peak_rss_mb": peak, "met": peak < 1000,
                                              "applies": large >= 1000}
    two = [s for s in speedups if s["workers"] == 2 and s["vs_workers"] == 1]
    if two:
        at = max(two, key=lambda s: s["size_mb"])
        goals["speedup_2_workers"] = {"size_mb": at["size_mb"], "speedup": at["speedup"], "met": at["speedup"] >= 1.7}
    print()
    if "linear_time" in goals:
        g = goals["linear_time"]
        print("time linear in size: s/MB at {:g} MB / s/MB at {:g} MB = {} -> {}".format(
            max(sizes), min(sizes), ", ".join(f"{v:.2f} ({t} worker(s))" for t, v in g["seconds_per_mb_ratio_largest_vs_smallest"].items()),
            "MET" if g["met"] else "NOT MET"))
    g = goals["peak_rss_below_1GB_at_largest"]
    print(f"peak RSS < 1 GB at {g['size_mb']:g} MB: {g['peak_rss_mb']:.0f} MB -> {'MET' if g['met'] else 'NOT MET'}"
          + ("" if g["applies"] else " (the goal is about 1000 MB; this size is smaller)"))
    if "speedup_2_workers" in goals:
        g = goals["speedup_2_workers"]
        print(f">= 1.7x with 2 workers (at {g['size_mb']:g} MB): {g['speedup']:.2f}x -> {'MET' if g['met'] else 'NOT MET'}")

    data = {
        "benchmark": "prepare",
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": info,
        "machine_after": {"loadavg_1_5_15": C.machine_info(torch_too=False)["loadavg_1_5_15"]},
        "results": list(cells.values()),
        "speedups": speedups,
        "goals": goals,
        "runs": runs,
    }
    path = C.write_results("prepare", data, args.out)
    print(f"results: {path}")
    return data


if __name__ == "__main__":
    main()
