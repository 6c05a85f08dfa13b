import contextlib
import json
import os
import subprocess

import numpy as np
import pytest
import tiktoken
import torch
from torch.utils.data import DataLoader

import gptlab.data.corpus as corpus_mod
import gptlab.data.prepare as prep
from gptlab.data.corpus import Corpus
from gptlab.data import TokenDataModule
from gptlab.data.datasets import FixedWindows, TrainBatches
from gptlab.data.download import TINY_SHAKESPEARE_SHA256, download
from gptlab.data.cache import CacheWriter, check_prepared
from gptlab.errors import ConfigError, DataError
from gptlab.files import FilesystemError, sha256_file, temp_name

from conftest import SHAKESPEARE

TEXT = SHAKESPEARE.read_text(encoding="utf-8")


def test_shared_corpus_is_the_published_one():
    assert sha256_file(SHAKESPEARE) == TINY_SHAKESPEARE_SHA256


@pytest.mark.parametrize(
    "tokenizer, train, val, vocab",
    [("char", 1_003_854, 111_540, 65), ("bpe", 301_966, 36_059, 50257)],
)
def test_prepare_known_figures_and_cache_reuse(tmp_path, tokenizer, train, val, vocab):
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(tmp_path), tokenizer=tokenizer)
    dm.prepare_data()
    meta = dm.prepared.meta
    assert meta["tokens"] == {"train": train, "val": val}
    assert meta["vocab_size"] == vocab and meta["dtype"] == "uint16"
    assert len(dm.prepared.tokens("train")) == train
    # the next run reuses the cache: same directory, files untouched
    stamp = (dm.prepared.directory / "train.bin").stat().st_mtime_ns
    again = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(tmp_path), tokenizer=tokenizer)
    again.prepare_data()
    assert again.prepared.directory == dm.prepared.directory
    assert (again.prepared.directory / "train.bin").stat().st_mtime_ns == stamp
    # the tokens decode back to the text (char) / match tiktoken on the whole split (bpe)
    ids = np.asarray(dm.prepared.tokens("val"))
    if tokenizer == "char":
        assert dm.tokenizer.decode(ids[:200].tolist()) == TEXT[1_003_854:1_003_854 + 200]
    else:
        enc = tiktoken.get_encoding("gpt2")
        assert ids.tolist() == enc.encode_ordinary(TEXT[int(len(TEXT) * 0.9):])


def test_streaming_chunks_do_not_change_bpe_tokens(tmp_path, monkeypatch):
    """Cut the corpus into many small chunks: the token files must equal whole-text encoding."""
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 4096)
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 1000)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT[:150_000], encoding="utf-8")
    (corpus / "b.txt").write_text("  x\n\n\n  " + TEXT[150_000:200_000] + "ünïcödé  ", encoding="utf-8")
    p = prep.prepare_corpus(Corpus(corpus), {"kind": "bpe", "encoding": "gpt2"}, tmp_path / "out",
                            workers=2, log=lambda *a: None)
    enc = tiktoken.get_encoding("gpt2")
    full = (corpus / "a.txt").read_text() + "<|endoftext|>" + (corpus / "b.txt").read_text()
    cut = int(len(full) * 0.9)
    expected_train = enc.encode(full[:cut], allowed_special="all")
    expected_val = enc.encode(full[cut:], allowed_special="all")
    assert np.asarray(p.tokens("train")).tolist() == expected_train
    assert np.asarray(p.tokens("val")).tolist() == expected_val
    assert 50256 in expected_train  # the document separator


@pytest.mark.parametrize("tokenizer", ["char", "word", "bpe"])
def test_worker_processes_write_the_same_tokens_as_one_process(tmp_path, monkeypatch, tokenizer):
    """Chunks encoded by forked worker processes come back in order: the token files are identical."""
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 20_000)  # ~15 chunks, some of them straddle the split
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT[:300_000], encoding="utf-8")
    spec = {"kind": tokenizer, "encoding": "gpt2"}
    one = prep.prepare_corpus([corpus], spec, tmp_path / "one", workers=1, log=lambda *a: None)
    three = prep.prepare_corpus([corpus], spec, tmp_path / "three", workers=3, log=lambda *a: None)
    for split in ("train", "val"):
        assert (one.directory / f"{split}.bin").read_bytes() == (three.directory / f"{split}.bin").read_bytes()
    assert one.meta["sha256"] == three.meta["sha256"] and one.meta["tokens"]["val"] > 0


def test_word_level_datamodule(tmp_path):
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(tmp_path), tokenizer="word", block_size=16)
    dm.setup()
    tok = dm.tokenizer
    assert tok.itos[-2:] == ["<|endoftext|>", "<|unk|>"]
    assert dm.vocab_size == len(tok.itos) > 10_000
    assert tok.decode(tok.encode("First Citizen: Before we proceed any further, hear me speak.")) == (
        "First Citizen: Before we proceed any further, hear me speak."
    )


def test_bad_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\x00\x01\x02" * 10)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    for path, message in [(empty, "empty"), (binary, "binary"), (latin, "not valid UTF-8"),
                          (tmp_path / "missing.txt", "not found")]:
        dm = TokenDataModule(path=str(path), data_dir=str(tmp_path / "cache"))
        with pytest.raises(DataError, match=message):
            dm.prepare_data()
    assert not list((tmp_path / "cache").glob("prepared/*")), "a failed preparation left files behind"


def test_block_size_larger_than_validation_split(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("abcdefghij" * 50)
    dm = TokenDataModule(path=str(small), data_dir=str(tmp_path), block_size=64)
    with pytest.raises(DataError, match="block_size=64 is larger than the validation split"):
        dm.prepare_data()


def test_download_from_local_server(http_server, tmp_path):
    root, base = http_server
    (root / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    dest = tmp_path / "cache" / "corpora" / "tinyshakespeare.txt"
    assert download(f"{base}/input.txt", dest, TINY_SHAKESPEARE_SHA256) == dest
    assert sha256_file(dest) == TINY_SHAKESPEARE_SHA256
    # the data module downloads on first use and prepares from the download
    dm = TokenDataModule(url=f"{base}/input.txt", data_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert dm.prepared.meta["tokens"]["train"] == 1_003_854
    assert [p.name for p in (tmp_path / "cache" / "corpora").iterdir()] == ["tinyshakespeare.txt"]


def test_download_wrong_checksum_keeps_nothing(http_server, tmp_path):
    root, base = http_server
    (root / "input.txt").write_bytes(b"not shakespeare\n" * 100)
    dest = tmp_path / "corpora" / "input.txt"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(f"{base}/input.txt", dest, TINY_SHAKESPEARE_SHA256)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_download_offline_error_says_what_to_do(tmp_path):
    # a port nobody listens on stands for "offline"
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(DataError, match="data.path=") as e:
        download(f"http://127.0.0.1:{port}/input.txt", tmp_path / "x.txt", TINY_SHAKESPEARE_SHA256)
    assert "GPTLAB_DATA_DIR" in str(e.value)


def _tokens(n=10_000):
    return np.arange(n, dtype=np.uint16) % 1000


def test_train_batches_reproducible_and_distinct_per_rank():
    tokens = _tokens()
    a = TrainBatches(tokens, 16, 4, seed=1, rank=0)
    b = TrainBatches(tokens, 16, 4, seed=1, rank=0)
    r1 = TrainBatches(tokens, 16, 4, seed=1, rank=1)
    x, y, k = a.batch(3)
    assert k == 3 and x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, b.batch(3)[0])
    assert not torch.equal(x, r1.batch(3)[0])
    assert not torch.equal(x, a.batch(4)[0])
    assert not torch.equal(x, TrainBatches(tokens, 16, 4, seed=2).batch(3)[0])


def test_train_batches_same_order_with_workers_and_resume():
    tokens = _tokens()
    ds = TrainBatches(tokens, 8, 2, seed=0)
    ref = [ds.batch(k)[0] for k in range(6)]
    loader = DataLoader(TrainBatches(tokens, 8, 2, seed=0), batch_size=None, num_workers=2)
    got = []
    for x, _, k in loader:
        got.append((k, x))
        if len(got) == 6:
            break
    assert [k for k, _ in got] == list(range(6))  # workers interleave back into batch order
    assert all(torch.equal(x, r) for (_, x), r in zip(got, ref))
    # the workers produced different windows (no shared-RNG repeats)
    assert not torch.equal(got[0][1], got[1][1])
    resumed = next(iter(TrainBatches(tokens, 8, 2, seed=0, start=4)))
    assert resumed[2] == 4 and torch.equal(resumed[0], ref[4])


def test_sliding_window_sampler_covers_windows_once_per_pass():
    tokens = np.arange(1 + 8 * 20, dtype=np.uint16)
    ds = TrainBatches(tokens, 8, 4, seed=0, sampler="sliding", stride=8)
    starts = np.concatenate([ds.starts(k) for k in range(5)])  # 20 windows, 5 batches of 4
    assert sorted(starts.tolist()) == list(range(0, 160, 8))
    x, y, _ = ds.batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_validation_windows_fixed():
    v = FixedWindows(_tokens(1000), 16, 10)
    assert len(v) == 10
    assert v.offsets[0] == 0 and v.offsets[-1] == 1000 - 17
    x, y = v[3]
    assert x.shape == (16,) and torch.equal(x[1:], y[:-1])


# -- reliability: full and read-only disks, killed preparations, damaged metadata, bad settings ----
SMALL = TEXT[:40_000]


@contextlib.contextmanager
def tmpfs(path, size="1m"):
    """A small tmpfs at `path` (we run as root in the test container); skip where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path):
    r = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount {path} read-only: {r.stderr.strip()}")


def leftovers(directory):
    return sorted(p.name for p in directory.rglob("*") if p.name.startswith("."))


def test_disk_full_during_preparation_is_one_line_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "small") as small:  # 1 MB: the char tokens of tiny Shakespeare need 2.2 MB
        dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(small), tokenizer="char")
        with pytest.raises(FilesystemError) as e:
            dm.prepare_data()
        message = str(e.value)
        assert "\n" not in message and "no space left" in message and str(small / "prepared") in message
        assert "data.data_dir" in message
        assert list((small / "prepared").iterdir()) == []  # no cache, no temporary directory


def test_disk_full_during_download_keeps_nothing(http_server, tmp_path):
    root, base = http_server
    (root / "input.txt").write_bytes(SHAKESPEARE.read_bytes())  # 1.1 MB into a 1 MB disk
    with tmpfs(tmp_path / "small") as small:
        dest = small / "corpora" / "tinyshakespeare.txt"
        with pytest.raises(FilesystemError, match="no space left") as e:
            download(f"{base}/input.txt", dest, TINY_SHAKESPEARE_SHA256)
        assert str(dest) in str(e.value)
        assert list(dest.parent.iterdir()) == []


def test_read_only_data_dir(http_server, tmp_path, monkeypatch):
    root, base = http_server
    (root / "input.txt").write_bytes(b"to be or not to be\n" * 200)
    small = tmp_path / "small.txt"
    small.write_text(SMALL)
    with tmpfs(tmp_path / "ro", size="8m") as ro:
        # a cache prepared earlier stays usable once the directory is read-only
        ready = TokenDataModule(path=str(small), data_dir=str(ro), tokenizer="char", block_size=16)
        ready.prepare_data()
        remount_read_only(ro)
        again = TokenDataModule(path=str(small), data_dir=str(ro), tokenizer="char", block_size=16)
        again.prepare_data()
        assert again.prepared.directory == ready.prepared.directory
        # what needs writing says so, in one line naming the path (chosen by $GPTLAB_DATA_DIR here)
        monkeypatch.setenv("GPTLAB_DATA_DIR", str(ro))
        for dm in (TokenDataModule(path=str(small), tokenizer="word", block_size=16),
                   TokenDataModule(url=f"{base}/input.txt", sha256=None)):
            with pytest.raises(FilesystemError, match=f"cannot .*{ro}.*read-only.*data.data_dir"):
                dm.prepare_data()
        assert leftovers(ro) == []


def _fork(child) -> int:
    """Run `child()` in a forked process (it must not return); the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_leftovers_of_killed_preparations_are_removed_but_live_ones_kept(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SMALL)
    prepared = tmp_path / "cache" / "prepared"
    prepared.mkdir(parents=True)
    # a preparation that died (as under SIGKILL) after creating its temporary directory and a file
    dead = _fork(lambda: (temp_name(prepared / "abc-char-val0.1", directory=True).mkdir(),
                          temp_name(prepared / "x.json").write_text("{")))
    os.waitpid(dead, 0)
    stale = sorted(p.name for p in prepared.iterdir())
    assert len(stale) == 2 and all(f"-{dead}-" in name for name in stale)
    # a live preparation of another corpus, halfway through writing its tokens
    go, ready = os.pipe(), os.pipe()

    def live_preparation():
        with CacheWriter(prepared / "other-char-val0.1", np.uint16) as w:
            w.write("train", np.arange(100))
            os.write(ready[1], b"1")
            os.read(go[0], 1)  # wait while the parent prepares
            w.write("val", np.arange(10))
            w.publish({"kind": "char", "chars": "".join(chr(65 + i) for i in range(100))}, 100, 0.1, {},
                      split={"by": "text", "seed": 0, "documents": {"train": 1, "val": 1}}, settings={})

    live = _fork(live_preparation)
    os.read(ready[0], 1)
    dm = TokenDataModule(path=str(corpus), data_dir=str(tmp_path / "cache"), tokenizer="char", block_size=16)
    dm.prepare_data()
    names = sorted(p.name for p in prepared.iterdir())
    assert not set(stale) & set(names)  # the dead process's debris is gone
    assert any(f"-{live}-" in n for n in names)  # the live one's temporary directory is untouched
    os.write(go[1], b"1")
    _, status = os.waitpid(live, 0)
    assert status == 0
    assert check_prepared(prepared / "other-char-val0.1") is None  # and it finished
    assert sorted(p.name for p in prepared.iterdir()) == sorted([dm.prepared.directory.name, "other-char-val0.1"])


def test_download_removes_a_killed_download(http_server, tmp_path):
    root, base = http_server
    (root / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    dest = tmp_path / "corpora" / "tinyshakespeare.txt"
    dest.parent.mkdir()
    dead = _fork(lambda: temp_name(dest).write_bytes(b"half a download"))
    os.waitpid(dead, 0)
    assert len(list(dest.parent.iterdir())) == 1
    download(f"{base}/input.txt", dest, TINY_SHAKESPEARE_SHA256)
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def _shorter_chars(meta):  # a vocabulary too short for the ids in the files, vocab_size agreeing with it
    meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:-5]
    meta["vocab_size"] -= 5


DAMAGE = {
    "not an object": lambda meta: [meta],
    "key missing": lambda meta: meta.pop("tokens") and meta,
    "tokenizer key missing": lambda meta: meta["tokenizer"].pop("chars") and meta,
    "wrong type": lambda meta: meta.update(tokens={"train": "many", "val": 3}) or meta,
    "dtype": lambda meta: meta.update(dtype="float64") or meta,
    "chars shorter than the ids": lambda meta: _shorter_chars(meta) or meta,
    "vocab_size differs": lambda meta: meta.update(vocab_size=meta["vocab_size"] + 1) or meta,
    "unknown tokenizer": lambda meta: meta.update(tokenizer={"kind": "nope"}) or meta,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_wrong_meta_json_is_reported_damaged_and_rebuilt(tmp_path, damage):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SMALL)
    files = prep.corpus_files(corpus)
    first = prep.prepare_corpus(files, {"kind": "char"}, tmp_path / "out", log=lambda *a: None)
    good = first.meta
    meta_path = first.directory / "meta.json"
    meta_path.write_text(json.dumps(DAMAGE[damage](json.loads(meta_path.read_text()))))
    problem = check_prepared(first.directory)
    assert problem is not None and "\n" not in problem
    messages = []
    again = prep.prepare_corpus(files, {"kind": "char"}, tmp_path / "out", log=messages.append)
    assert any("damaged" in m for m in messages), messages
    assert again.meta == good and check_prepared(again.directory) is None
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.directory.name]


def test_byte_order_mark_is_not_a_character(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(SMALL, encoding="utf-8")
    marked.write_text(SMALL, encoding="utf-8-sig")
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
    a = prep.prepare_corpus([plain], {"kind": "char"}, tmp_path / "out", log=lambda *a: None)
    b = prep.prepare_corpus([marked], {"kind": "char"}, tmp_path / "out", log=lambda *a: None)
    assert "\ufeff" not in b.meta["tokenizer"]["chars"] and b.meta["tokenizer"] == a.meta["tokenizer"]
    assert b.meta["sha256"] == a.meta["sha256"]  # the same tokens


@pytest.mark.parametrize("settings, message", [
    ({"val_fraction": "0.1"}, "data.val_fraction='0.1'"),
    ({"val_fraction": 1.0}, "data.val_fraction=1.0"),
    ({"val_fraction": 0}, "data.val_fraction=0"),
    ({"sampler": "sliding", "stride": 0}, "data.stride=0"),
    ({"sampler": "sliding", "stride": -4}, "data.stride=-4"),
    ({"sampler": "shuffled"}, "data.sampler='shuffled'"),
    ({"num_workers": -1}, "data.num_workers=-1"),
    ({"prepare_workers": 0}, "data.prepare_workers=0"),
    ({"batch_size": 0}, "data.batch_size=0"),
    ({"val_windows": 2.5}, "data.val_windows=2.5"),
    ({"block_size": 0}, "model.block_size=0"),
    ({"tokenizer": "bytes"}, "data.tokenizer='bytes'"),
    ({"verify": "yes"}, "data.verify='yes'"),
])
def test_datamodule_rejects_bad_settings_naming_the_key(settings, message):
    with pytest.raises(ConfigError) as e:
        TokenDataModule(**settings)
    assert str(e.value).startswith(message)


def test_model_block_size_zero_is_reported_as_the_model_setting(tmp_path):
    import hydra

    from inprocess import compose_config

    cfg = compose_config([f"data.path={SHAKESPEARE}", "model.block_size=0", f"paths.data_dir={tmp_path}"])
    with pytest.raises(Exception) as e:  # Hydra wraps what the constructor raised; train.py unwraps it
        hydra.utils.instantiate(cfg.data)
    cause = e.value if isinstance(e.value, ConfigError) else e.value.__cause__
    assert isinstance(cause, ConfigError) and str(cause) == "model.block_size=0: must be a positive integer"
