"""BPE corpus preparation speed and memory: gptlab.data.prepare.prepare_corpus with tiktoken gpt2.

For every size a corpus is built by repeating tiny Shakespeare into a temporary directory (--tmp,
default /tmp; MB = 10^6 bytes throughout). Every (size, workers) run prepares it into an empty cache
directory in a fresh Python subprocess, so that the peak RSS belongs to that run alone. With N > 1
workers prepare_corpus forks N encoding processes. Memory is reported two ways: "peak PSS", the
run's physical footprint (the proportional set size of the subprocess and its workers, summed, sampled
every 0.1 s: a page that several processes share is split between them), and "RSS sum", a pessimistic
bound, the driver process's VmHWM plus N times the largest worker's ru_maxrss (pages the workers
share copy-on-write with their parent, such as pyarrow's libraries, are counted once per process).
The memory goals are judged on the peak PSS. The child loads the gpt2 encoding
before starting the clock (its load time is reported separately), so `time` is prepare_corpus
itself: hashing the corpus, the character-count pass, the tokenizing pass and writing the token files.
The corpus was just written, so it is read from the page cache.

`workers=1` encodes in the driver process, one tiktoken call at a time: the single-threaded tiktoken
rate; speedup = time(1 worker) / time(N workers). Runs alternate the order from repeat to repeat. Temporary files are removed at the end
(also on errors and Ctrl-C) unless --keep.

    python bench/prepare.py                                   # 10, 100, 1000 MB x 1, 2 workers
    python bench/prepare.py --sizes 1 --workers 1             # smoke test

--formats text,jsonl,parquet: input formats at equal text. Tiny Shakespeare is cut into documents of
about --doc-kb KB at blank lines (paragraph boundaries), repeated to each size (MB of document
text), and written once per format: "text" as ONE .txt file with the documents joined by a blank
line (so its bytes are the documents' bytes plus 2 per document; to gptlab it is one document, split
by characters), "jsonl" as one {"text": ...} line per document, "parquet" as one row per document
(pyarrow, row groups of --row-group rows, snappy, the plain pages a corpus of unique documents
gets), and optionally "txtdir" as a folder with one .txt per document (the same document count as
the records, plus one file open per document). One .txt is the fair baseline for the reading cost:
every format then hands the tokenizer the same text, so the differences are the reading paths (UTF-8
decoding vs JSON parsing vs Arrow batches, which the encoding workers read themselves) and the
per-document split; a folder of .txt adds per-file filesystem costs.
Every (size, format) is prepared with --workers (default 2) in a fresh subprocess; MB/s counts
the documents' text (the same for every format). The formats run back to back within a repeat
(the order reversed every other repeat), and `x text` is the median over the repeats of time / the
.txt's time in the same repeat: on a machine whose speed drifts within minutes, the runs of one
repeat share a machine speed that separate medians do not.

--bpe-train SIZE_MB: what data.tokenizer=bpe_train data.vocab_size=4096 (--vocab) costs on SIZE_MB
of tiny Shakespeare repeated: the tokenizer training alone (HF tokenizers on the file's pieces) and
the whole prepare_corpus (count, train on the training split, encode), each in a subprocess, with
time and peak RSS. Repeated text has tiny Shakespeare's few unique words at any size, so the
trainer's word table stays small: a real corpus of that size needs more memory than this shows.

    python bench/prepare.py --formats text,jsonl,parquet --sizes 10,100      # formats at 2 workers
    python bench/prepare.py --bpe-train 100
    python bench/prepare.py --formats text,jsonl,parquet --sizes 2           # smoke tests
    python bench/prepare.py --bpe-train 2
    python bench/prepare.py --tiny                            # seconds: 0.2 MB, 2 workers (--formats, --bpe-train too)

Writes bench/results/prepare.json, prepare_formats.json or prepare_bpe_train.json (or --out).
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
import threading
import time
from pathlib import Path

import _common as C


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="corpus sizes in MB (10^6 bytes), comma-separated "
                   "(default: 10,100,1000; with --formats 10,100)")
    p.add_argument("--workers", default=None, help="prepare_corpus(workers=...) values to compare, comma-separated "
                   "(default: 1,2; with --formats 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per (size, workers) (default: %(default)s)")
    p.add_argument("--encoding", default="gpt2", help="tiktoken encoding (default: %(default)s)")
    p.add_argument("--formats", default=None, help="compare input formats instead: text,jsonl,parquet[,txtdir]")
    p.add_argument("--doc-kb", type=float, default=4.0, help="--formats: document size in KB (default: %(default)s)")
    p.add_argument("--row-group", type=int, default=1024, help="--formats: Parquet rows per row group (default: %(default)s)")
    p.add_argument("--bpe-train", type=float, default=None, metavar="SIZE_MB",
                   help="time training the BPE of --vocab tokens on SIZE_MB of text instead")
    p.add_argument("--vocab", type=int, default=4096, help="--bpe-train: vocabulary size (default: %(default)s)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary directory goes (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="seconds: 0.2 MB at 2 workers, one repeat (with --bpe-train: "
                   "0.2 MB, 512 tokens); checks the code paths, the figures mean nothing")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/prepare*.json)")
    p.add_argument("--child", nargs=4, metavar=("CORPUS", "OUT_ROOT", "WORKERS", "TOKENIZER_JSON"), help=argparse.SUPPRESS)
    p.add_argument("--child-train", nargs=2, metavar=("CORPUS", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.formats and args.bpe_train:
        p.error("--formats and --bpe-train are separate runs")
    if args.tiny:
        args.sizes, args.workers, args.repeats, args.vocab = "0.2", "2", 1, 512
        args.bpe_train = args.bpe_train and 0.2
    args.sizes = args.sizes or ("10,100" if args.formats else "10,100,1000")
    args.workers = args.workers or ("2" if args.formats else "1,2")
    return args


# -- inside the subprocess ----------------------------------------------------------------------------
def proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(who: int | None = None) -> float:
    """CPU seconds of this process and its joined workers (who=None), or of RUSAGE_SELF / _CHILDREN alone."""
    if who is not None:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime
    return cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)


def peaks(result: dict, workers: int) -> dict:
    """Memory figures of this process (and its joined workers) into `result`."""
    result.update(
        vmhwm_kb=proc_status_kb("VmHWM"),
        ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # kB on Linux
        workers_max_rss_kb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,  # largest worker
    )
    result["total_peak_kb"] = result["vmhwm_kb"] + (workers * result["workers_max_rss_kb"] if workers > 1 else 0)
    return result


def child(corpus: str, out_root: str, workers: str, tokenizer_json: str) -> None:
    from gptlab.data.prepare import prepare_corpus

    spec = json.loads(tokenizer_json)
    t0 = time.perf_counter()
    if spec["kind"] == "bpe":
        import tiktoken

        tiktoken.get_encoding(spec["encoding"])  # cached by tiktoken: prepare_corpus gets this object
    encoding_load_s = time.perf_counter() - t0
    base_rss_kb = proc_status_kb("VmRSS")
    cpu0, driver0 = cpu_seconds(), cpu_seconds(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    prepared = prepare_corpus([Path(corpus)], spec, Path(out_root), workers=int(workers), log=lambda *a, **k: None)
    dt = time.perf_counter() - t0
    result = {
        "time_s": dt,
        "encoding_load_s": encoding_load_s,
        "bytes": prepared.meta["corpus"]["bytes"],
        "chars": prepared.meta["corpus"]["chars"],
        "documents": prepared.meta["corpus"].get("documents"),
        "split_by": prepared.meta.get("split", {}).get("by"),
        "vocab_size": prepared.meta.get("vocab_size"),
        "tokens": sum(prepared.meta["tokens"].values()),
        "tokens_split": prepared.meta["tokens"],
        "base_rss_kb": base_rss_kb,
        "cpu_s": cpu_seconds() - cpu0,  # this process and its (joined) workers
        "driver_cpu_s": cpu_seconds(resource.RUSAGE_SELF) - driver0,  # reading, splitting, writing
    }
    print("RESULT " + json.dumps(peaks(result, int(workers))), flush=True)


def child_train(corpus: str, vocab: str) -> None:
    """The tokenizer training of data.tokenizer=bpe_train alone, on every piece of the corpus."""
    from gptlab.data.corpus import Corpus
    from gptlab.data.trained_bpe import TrainedBPETokenizer

    base_rss_kb = proc_status_kb("VmRSS")
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    tok = TrainedBPETokenizer.train((text for _, text in Corpus([Path(corpus)]).pieces()), int(vocab))
    result = {"time_s": time.perf_counter() - t0, "vocab_size": tok.vocab_size, "base_rss_kb": base_rss_kb,
              "bytes": Path(corpus).stat().st_size, "cpu_s": cpu_seconds() - cpu0}
    print("RESULT " + json.dumps(peaks(result, 1)), flush=True)


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


def run_child(corpus: Path, out_root: Path, workers: int, tokenizer: dict | str) -> dict:
    """One prepare_corpus in a fresh subprocess into `out_root`, removed afterwards; `tokenizer` is a
    spec or a tiktoken encoding name."""
    spec = tokenizer if isinstance(tokenizer, dict) else {"kind": "bpe", "encoding": tokenizer}
    try:
        return run_script(["--child", str(corpus), str(out_root), str(workers), json.dumps(spec)])
    finally:
        shutil.rmtree(out_root, ignore_errors=True)


def tree_pss_kb(root: int) -> int:
    """The proportional set size of `root` and all its descendants, summed (kB): the physical memory
    the run occupies, each shared page split between the processes that map it (Linux's smaps_rollup)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(frontier)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass  # exited in between
    return total


class PssSampler(threading.Thread):
    """Samples tree_pss_kb of a process every `interval` seconds and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kb, self.done = pid, interval, 0, threading.Event()

    def run(self) -> None:
        if not Path("/proc/self/smaps_rollup").exists():
            return
        while not self.done.wait(self.interval):
            self.peak_kb = max(self.peak_kb, tree_pss_kb(self.pid))


def run_script(child_args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *child_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    sampler = PssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"prepare subprocess failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["subprocess_wall_s"] = wall
    res["peak_rss_mb"] = res["total_peak_kb"] * 1024 / 1e6
    res["peak_pss_mb"] = sampler.peak_kb * 1024 / 1e6 if sampler.peak_kb else None
    return res


# -- --formats: the same documents as .txt, .jsonl, .parquet --------------------------------------
FORMATS = ("text", "jsonl", "parquet", "txtdir")


def shakespeare_documents(doc_bytes: int) -> list[str]:
    """Tiny Shakespeare cut at blank lines (between speeches) into documents of about `doc_bytes`."""
    docs, group, size = [], [], 0
    for paragraph in C.SHAKESPEARE.read_text(encoding="utf-8").split("\n\n"):
        group.append(paragraph)
        size += len(paragraph) + 2
        if size >= doc_bytes:
            docs.append("\n\n".join(group))
            group, size = [], 0
    if group:
        docs.append("\n\n".join(group))
    return [d for d in docs if d.strip()]


def repeated_documents(docs: list[str], size_bytes: int) -> list[str]:
    """Whole documents, cycling through `docs`, until their text reaches `size_bytes` (ASCII: chars = bytes)."""
    out, total, i = [], 0, 0
    while total < size_bytes:
        out.append(docs[i % len(docs)])
        total += len(out[-1])
        i += 1
    return out


def write_format(fmt: str, docs: list[str], path: Path, row_group: int) -> Path:
    """`docs` as one corpus of format `fmt` at `path` (+ suffix); returns what data.path would name."""
    if fmt == "text":
        path = path.with_suffix(".txt")
        with open(path, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write("\n\n" + d if i else d)
    elif fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path.with_suffix(".parquet")
        schema = pa.schema([("text", pa.string())])
        # snappy, pyarrow's default; no dictionary: a real corpus's documents are unique, and its
        # writer falls back to plain pages, where repeated Shakespeare would dictionary-encode
        with pq.ParquetWriter(path, schema, use_dictionary=False) as w:
            for i in range(0, len(docs), row_group):
                w.write_table(pa.table({"text": docs[i:i + row_group]}, schema=schema), row_group_size=row_group)
    elif fmt == "txtdir":
        path.mkdir()
        width = len(str(len(docs)))
        for i, d in enumerate(docs):
            (path / f"{i:0{width}d}.txt").write_text(d, encoding="utf-8")
    else:
        raise SystemExit(f"--formats: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return path


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class Workdir:
    """The temporary directory of a run, removed at the end (also on errors and Ctrl-C) unless --keep."""

    def __init__(self, args: argparse.Namespace, prefix: str):
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=args.tmp))
        self.keep = args.keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if self.keep:
            print(f"[bench] kept {self.path}")
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def start(args: argparse.Namespace, what: str) -> dict:
    info = C.machine_info(torch_too=False)
    try:
        import tiktoken

        info["tiktoken"] = tiktoken.__version__
    except ImportError:
        pass
    print(f"[bench] {C.machine_line(info)}")
    print(f"[bench] {what}")
    return info


def formats_main(args: argparse.Namespace) -> dict:
    sizes, formats = C.float_list(args.sizes), [f.strip() for f in args.formats.split(",") if f.strip()]
    workers_list = C.int_list(args.workers)
    if "text" not in formats:
        formats.insert(0, "text")  # the baseline of every ratio
    info = start(args, f"prepare_corpus(bpe {args.encoding}) of the same documents (~{args.doc_kb:g} KB each) "
                       f"as {', '.join(formats)}, {sizes} MB of text, workers {workers_list}, {args.repeats} "
                       f"repeat(s); one subprocess per run")
    base_docs = shakespeare_documents(int(args.doc_kb * 1000))
    runs = []
    with Workdir(args, "gptlab-bench-formats-") as work:
        for size in sizes:
            docs = repeated_documents(base_docs, int(size * 1e6))
            text_bytes = sum(len(d) for d in docs)
            for rep in range(args.repeats):
                order = formats if rep % 2 == 0 else formats[::-1]
                for fmt in order:
                    free = shutil.disk_usage(work).free
                    if free < 3 * text_bytes + (100 << 20):
                        raise SystemExit(f"not enough space in {work}: {free / 1e6:.0f} MB free, need about "
                                         f"{3 * text_bytes / 1e6:.0f} MB for {size:g} MB (use --tmp)")
                    t0 = time.perf_counter()
                    corpus = write_format(fmt, docs, work / f"corpus-{size:g}MB-{fmt}", args.row_group)
                    written_s = time.perf_counter() - t0
                    for workers in workers_list:
                        out_root = work / f"prepared-{size:g}MB-{fmt}-t{workers}-r{rep}"
                        res = run_child(corpus, out_root, workers, args.encoding)
                        res.update(size_mb=size, format=fmt, workers=workers, repeat=rep, text_bytes=text_bytes,
                                   n_docs=len(docs), file_bytes=disk_bytes(corpus), write_s=written_s,
                                   mb_per_s=text_bytes / 1e6 / res["time_s"])
                        runs.append(res)
                        print(f"[bench]   {size:g} MB {fmt}, {workers} worker(s): {res['time_s']:.2f}s, "
                              f"{res['mb_per_s']:.2f} MB/s of text, peak PSS {res['peak_pss_mb'] or 0:.0f} MB, "
                              f"RSS sum {res['peak_rss_mb']:.0f} MB", flush=True)
                    remove(corpus)

    cells = {}
    for size in sizes:
        for workers in workers_list:
            for fmt in formats:
                rs = [r for r in runs if (r["size_mb"], r["workers"], r["format"]) == (size, workers, fmt)]
                t = statistics.median(r["time_s"] for r in rs)
                cells[(size, workers, fmt)] = {
                    "size_mb": size, "workers": workers, "format": fmt, "time_s": t,
                    "times_s": [r["time_s"] for r in rs],
                    "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                    "driver_cpu_s": statistics.median(r["driver_cpu_s"] for r in rs),
                    "text_mb": rs[0]["text_bytes"] / 1e6, "file_mb": rs[0]["file_bytes"] / 1e6,
                    "input_documents": rs[0]["n_docs"], "documents": rs[0]["documents"],
                    "split_by": rs[0]["split_by"], "tokens": rs[0]["tokens"],
                    "mb_per_s": rs[0]["text_bytes"] / 1e6 / t,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "peak_pss_mb": max((r["peak_pss_mb"] or 0) for r in rs) or None,
                }
    for c in cells.values():
        # each repeat runs every format back to back, so its ratio compares runs at one machine speed;
        # the median of those ratios is steadier on a machine whose speed drifts than a ratio of medians
        key = (c["size_mb"], c["workers"])
        pairs = [r["time_s"] / t["time_s"] for r in runs for t in runs
                 if (r["size_mb"], r["workers"], r["format"]) == (*key, c["format"])
                 and (t["size_mb"], t["workers"], t["format"]) == (*key, "text") and r["repeat"] == t["repeat"]]
        c["x_text_by_repeat"] = pairs
        c["x_text"] = statistics.median(pairs)
        c["x_text_of_medians"] = c["time_s"] / cells[(*key, "text")]["time_s"]
    rows = [[f"{c['size_mb']:g}", c["format"], c["workers"], f"{c['file_mb']:.1f}", f"{c['documents']:,}",
             c["split_by"], f"{c['tokens']:,}", f"{c['time_s']:.2f}", f"{c['cpu_s']:.2f}",
             f"{c['driver_cpu_s']:.2f}", f"{c['mb_per_s']:.2f}", f"{c['x_text']:.2f}",
             " ".join(f"{x:.2f}" for x in c["x_text_by_repeat"]), f"{c['peak_pss_mb'] or 0:.0f}",
             f"{c['peak_rss_mb']:.0f}"] for c in cells.values()]
    print()
    print(C.table(["size MB", "format", "workers", "file MB", "documents", "split by", "tokens", "time s", "CPU s",
                   "driver CPU s", "MB/s", "x text", "by repeat", "peak PSS MB", "RSS sum MB"], rows, left=(0, 1, 5)))
    print("(size and MB/s: MB of document text, the same for every format; file MB: on disk; documents: as "
          "gptlab counts them (one .txt file is one document); time, CPU: medians over the repeats; driver CPU: "
          "the process that reads and splits, the rest is the encoding workers; x text: the median over the "
          "repeats of time / the .txt's time in that repeat; MB = 10^6 bytes)")

    # the goal is set at the largest size (1 GB by default), where a run's fixed costs (importing
    # pyarrow, forking) no longer count; smaller sizes are shown beside it
    worst = max((c for c in cells.values() if c["format"] != "text" and c["size_mb"] == max(sizes)),
                key=lambda c: c["x_text"], default=None)
    goals = {}
    if worst:
        goals["within_15pct_of_text"] = {"worst": {k: worst[k] for k in ("size_mb", "workers", "format", "x_text")},
                                         "met": worst["x_text"] <= 1.15, "at": "the largest size"}
    memory = "peak_pss_mb" if all(c["peak_pss_mb"] for c in cells.values()) else "peak_rss_mb"
    by_size = {s: max(c[memory] for c in cells.values() if c["size_mb"] == s) for s in sizes}
    peak = max(by_size.values())
    growth = by_size[max(sizes)] / by_size[min(sizes)]
    goals["peak_memory_flat_below_300MB"] = {"peak_mb_by_size": by_size, "growth_largest_vs_smallest": growth,
                                          "met": peak < 300 and (len(sizes) == 1 or growth <= 1.2),
                                          "measure": memory,
                                          "rule": "peak < 300 MB at every size, and at most 20% more at the "
                                                  "largest size than at the smallest"}
    print()
    if worst:
        g = goals["within_15pct_of_text"]
        print(f"within 15% of text at the largest size: worst {worst['format']} at {worst['size_mb']:g} MB, {worst['x_text']:.2f}x "
              f"-> {'MET' if g['met'] else 'NOT MET'}")
    g = goals["peak_memory_flat_below_300MB"]
    print(f"peak {'PSS' if memory == 'peak_pss_mb' else 'RSS sum'} flat and < 300 MB: " + ", ".join(f"{v:.0f} MB at {s:g} MB" for s, v in by_size.items())
          + f" -> {'MET' if g['met'] else 'NOT MET'}")
    if min(sizes) * 1e6 <= 2 * (1 << 20):
        print("(a corpus of at most 2 MiB is prepared in one process whatever the workers: one chunk)")
    data = {"benchmark": "prepare_formats", "args": public_args(args), "machine": info,
            "machine_after": {"loadavg_1_5_15": C.machine_info(torch_too=False)["loadavg_1_5_15"]},
            "documents_in_tiny_shakespeare": len(base_docs), "results": list(cells.values()), "goals": goals,
            "runs": runs}
    print(f"results: {C.write_results('prepare_formats', data, args.out)}")
    return data


# -- --bpe-train: training the BPE of data.tokenizer=bpe_train ------------------------------------
def bpe_train_main(args: argparse.Namespace) -> dict:
    size = args.bpe_train
    info = start(args, f"data.tokenizer=bpe_train data.vocab_size={args.vocab} on tiny Shakespeare repeated to "
                       f"{size:g} MB; one subprocess per run")
    spec = {"kind": "bpe_train", "vocab_size": args.vocab}
    rows = []
    with Workdir(args, "gptlab-bench-bpe-train-") as work:
        size_bytes = int(size * 1e6)
        free = shutil.disk_usage(work).free
        if free < 3 * size_bytes + (100 << 20):
            raise SystemExit(f"not enough space in {work}: {free / 1e6:.0f} MB free, need about "
                             f"{3 * size_bytes / 1e6:.0f} MB (use --tmp)")
        corpus = work / f"corpus-{size:g}MB.txt"
        build_corpus(corpus, size_bytes)
        for rep in range(args.repeats):
            res = run_script(["--child-train", str(corpus), str(args.vocab)])
            res.update(step="train the tokenizer (all the text)", repeat=rep)
            rows.append(res)
            print(f"[bench]   training alone: {res['time_s']:.1f}s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
            out_root = work / f"prepared-r{rep}"
            res = run_child(corpus, out_root, 1, spec)
            res.update(step="prepare_corpus (count, train on 90%, encode)", repeat=rep)
            rows.append(res)
            print(f"[bench]   prepare_corpus: {res['time_s']:.1f}s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    results = []
    for step in dict.fromkeys(r["step"] for r in rows):
        rs = [r for r in rows if r["step"] == step]
        t = statistics.median(r["time_s"] for r in rs)
        results.append({"step": step, "size_mb": size, "vocab": args.vocab, "time_s": t,
                        "cpu_s": statistics.median(r["cpu_s"] for r in rs), "mb_per_s": size_bytes / 1e6 / t,
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "vocab_size": rs[0]["vocab_size"]})
    print()
    print(C.table(["step", "size MB", "vocab", "time s", "CPU s", "MB/s", "peak RSS MB"],
                  [[r["step"], f"{size:g}", r["vocab_size"], f"{r['time_s']:.1f}", f"{r['cpu_s']:.1f}",
                    f"{r['mb_per_s']:.2f}", f"{r['peak_rss_mb']:.0f}"] for r in results]))
    print("(CPU s: user + system time, above time s where HF tokenizers runs several threads; repeated text has "
          "few unique words, so a real corpus of this size needs more memory; MB = 10^6 bytes)")
    data = {"benchmark": "prepare_bpe_train", "args": public_args(args), "machine": info,
            "machine_after": {"loadavg_1_5_15": C.machine_info(torch_too=False)["loadavg_1_5_15"]},
            "results": results, "runs": rows}
    print(f"results: {C.write_results('prepare_bpe_train', data, args.out)}")
    return data


def public_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("child")}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return None
    if args.child_train:
        child_train(*args.child_train)
        return None
    if args.formats:
        return formats_main(args)
    if args.bpe_train:
        return bpe_train_main(args)
    sizes = C.float_list(args.sizes)
    workers_list = C.int_list(args.workers)
    info = start(args, f"prepare_corpus(bpe {args.encoding}) on tiny Shakespeare repeated to {sizes} MB, "
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
                    res = run_child(corpus, out_root, workers, args.encoding)
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
        "args": public_args(args),
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
