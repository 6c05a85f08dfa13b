import functools
import http.server
import threading

import numpy as np
import pytest
import tiktoken
import torch
from torch.utils.data import DataLoader

import gptlab.data.corpus as corpus_mod
import gptlab.data.prepare as prep
from gptlab.data import TokenDataModule
from gptlab.data.datasets import FixedWindows, TrainBatches
from gptlab.data.download import TINY_SHAKESPEARE_SHA256, download
from gptlab.files import sha256_file
from gptlab.errors import DataError

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
    files = prep.corpus_files(corpus)
    p = prep.prepare_corpus(files, {"kind": "bpe", "encoding": "gpt2"}, tmp_path / "out", corpus_root=corpus,
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


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


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
