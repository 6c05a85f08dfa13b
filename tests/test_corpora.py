"""Corpus formats (JSONL, gzip/zstd JSONL, Parquet, saved datasets, folders of shards), the split by
document, the trained BPE tokenizer and bad input, on small corpora the tests write."""

import gzip
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gptlab.data import TokenDataModule  # noqa: E402
from gptlab.data.cache import check_prepared  # noqa: E402
from gptlab.data.corpus import Corpus  # noqa: E402
from gptlab.data.prepare import prepare_corpus  # noqa: E402
from gptlab.data.tokenizers import ENDOFTEXT, tokenizer_from_state  # noqa: E402
from gptlab.data.trained_bpe import TrainedBPETokenizer  # noqa: E402
from gptlab.errors import ConfigError, DataError  # noqa: E402

from conftest import SHAKESPEARE  # noqa: E402

TEXT = SHAKESPEARE.read_text(encoding="utf-8")
# ~400 documents: the paragraphs of the first 60k characters, a few with non-ASCII text
DOCS = [p for p in TEXT[:60_000].split("\n\n") if p]
DOCS[3] += " — naïve café ✓"
DOCS[10] = "Ünïcödé 😀 and a literal <|endoftext|> inside a document"
QUIET = {"log": lambda *a: None}


def as_text_files(directory, docs=DOCS):
    """The reference corpus: one .txt file per document, in document order."""
    directory.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:05d}.txt").write_text(doc, encoding="utf-8")
    return directory


def write_jsonl(path, docs=DOCS, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return path


def write_parquet(path, docs=DOCS, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=50)
    return path


def write_zst(path, docs=DOCS):
    import zstandard

    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def tokens(prepared):
    return {s: np.asarray(prepared.tokens(s)).tolist() for s in ("train", "val")}


def prepare(corpus, out, kind="bpe", **kwargs):
    spec = {"bpe": {"kind": "bpe", "encoding": "gpt2"}, "char": {"kind": "char"}}.get(kind, kind)
    return prepare_corpus(corpus if isinstance(corpus, Corpus) else Corpus(corpus), spec, out, **QUIET, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    txt = as_text_files(root / "txt")
    return {kind: prepare(txt, root / "out", kind) for kind in ("bpe", "char")}


def saved_dataset(path, docs=DOCS):
    import datasets

    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(str(path))
    return path


def shards(directory):
    """The documents in a folder of mixed shards whose sorted order is the document order."""
    directory.mkdir()
    write_jsonl(directory / "a.jsonl", DOCS[:100])
    write_jsonl(directory / "b.jsonl.gz", DOCS[100:200], opener=gzip.open)
    write_parquet(directory / "c.parquet", DOCS[200:300])
    (directory / "d").mkdir()
    write_zst(directory / "d" / "e.jsonl.zst", DOCS[300:])
    (directory / ".hidden.jsonl").write_text('{"text": "not part of the corpus"}\n')
    return directory


FORMATS = {
    "jsonl": lambda d: write_jsonl(d / "docs.jsonl"),
    "jsonl.gz": lambda d: write_jsonl(d / "docs.jsonl.gz", opener=gzip.open),
    "jsonl.zst": lambda d: write_zst(d / "docs.jsonl.zst"),
    "parquet": lambda d: write_parquet(d / "docs.parquet"),
    "save_to_disk": lambda d: saved_dataset(d / "saved"),
    "folder of shards": lambda d: shards(d / "shards"),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_give_the_tokens_of_the_same_documents_as_text(tmp_path, reference, fmt):
    source = FORMATS[fmt](tmp_path)
    for kind in ("bpe", "char"):
        got = prepare(source, tmp_path / "out", kind)
        assert tokens(got) == tokens(reference[kind]), f"{fmt} / {kind}"
        assert got.meta["tokenizer"] == reference[kind].meta["tokenizer"]
        assert got.meta["corpus"]["documents"] == len(DOCS) and got.meta["split"]["by"] == "document"


def test_small_chunks_and_worker_processes_do_not_change_the_tokens(tmp_path, reference, monkeypatch):
    """Documents cut into many pieces (the longest ones too) and batches encoded by forked workers."""
    import gptlab.data.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 300)
    assert max(map(len, DOCS)) > 2 * 300
    path = write_jsonl(tmp_path / "docs.jsonl")
    for kind in ("bpe", "char"):
        assert tokens(prepare(path, tmp_path / f"out-{kind}", kind, workers=3)) == tokens(reference[kind])
    # Parquet row groups read by the workers themselves (BPE), an empty and a null record among them
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = DOCS[:7] + [""] + DOCS[7:200] + [None] + DOCS[200:]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), tmp_path / "docs.parquet", row_group_size=30)
    corpus = Corpus(tmp_path / "docs.parquet")
    got = prepare(corpus, tmp_path / "out-parquet", workers=3)
    assert len(corpus.record_groups(1 << 20)) == 14 and corpus.record_groups(100) is None  # the path taken
    assert tokens(got) == tokens(reference["bpe"]) and got.meta["split"] == reference["bpe"].meta["split"]


def test_a_batch_of_documents_encodes_as_each_document_alone():
    """tiktoken encodes a whole batch in one call (the documents joined by the end-of-text token):
    the ids must equal each document's own ordinary encoding, the end-of-text id between; a batch
    holding the special token's text as plain text takes the call-per-piece path, with equal ids."""
    import tiktoken

    from gptlab.data.encode import corpus_encoder
    from gptlab.data.tokenizers import BPETokenizer

    enc, tok = tiktoken.get_encoding("gpt2"), BPETokenizer("gpt2")
    eot = np.array([tok.eot_id], dtype=np.uint16)
    encode = corpus_encoder(tok, np.uint16)
    # documents that end and start in spaces, newlines and punctuation, where a cross-document merge
    # of the pre-tokenizer would show; and two pieces of one document, cut at a safe place
    docs = ["Hello world  ", "\n\n  indented", "end.", "  ", "x\n", "'s contraction", DOCS[3]]
    items = [docs[0], eot, docs[1], eot, docs[2], eot, docs[3], eot, docs[4], eot, docs[5], eot, "A cut", " piece"]
    want = []
    for item in items:
        want += [tok.eot_id] if isinstance(item, np.ndarray) else enc.encode_ordinary(item)
    assert encode(items).tolist() == want
    assert encode([docs[6], eot, DOCS[10]]).tolist() == (
        enc.encode_ordinary(docs[6]) + [tok.eot_id] + enc.encode_ordinary(DOCS[10]))
    # an encoding with more special tokens (cl100k has five): their text in a document is plain text too
    tok.enc = tiktoken.Encoding("gpt2-fim", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                special_tokens={ENDOFTEXT: enc.eot_token, "<|fim_prefix|>": enc.n_vocab})
    items = ["a <|fim_prefix|> b", eot, "c"]
    want = enc.encode_ordinary(items[0]) + [tok.eot_id] + enc.encode_ordinary("c")
    assert corpus_encoder(tok, np.uint32)(items).tolist() == want


def test_counting_a_parquet_column_in_arrow_equals_counting_its_pieces(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:120] + [""] + DOCS[120:]  # an empty record and, below, a null one: neither is a document
    pq.write_table(pa.table({"text": pa.array(docs[:60] + [None] + docs[60:])}), tmp_path / "d.parquet", row_group_size=40)
    corpus = Corpus(tmp_path / "d.parquet")
    seen = [0, 0]
    for starts, text in corpus.pieces():
        seen[0] += starts
        seen[1] += len(text)
    assert corpus.count() == corpus.count(workers=2) == tuple(seen) == (len(docs) - 1, sum(map(len, docs)))


def test_a_list_of_paths_is_one_corpus_in_that_order(tmp_path, reference):
    first = write_jsonl(tmp_path / "first.jsonl", DOCS[:150])
    rest = write_parquet(tmp_path / "rest.parquet", DOCS[150:])
    assert tokens(prepare([first, rest], tmp_path / "out")) == tokens(reference["bpe"])
    # and through the data module, as data.path=[...] gives it
    dm = TokenDataModule(path=[str(first), str(rest)], data_dir=str(tmp_path / "dm"), tokenizer="bpe", block_size=16)
    dm.prepare_data()
    assert tokens(dm.prepared) == tokens(reference["bpe"])


def test_text_field_names_the_column(tmp_path, reference):
    path = write_jsonl(tmp_path / "docs.jsonl", field="body")
    dm = TokenDataModule(path=str(path), data_dir=str(tmp_path), tokenizer="bpe", text_field="body", block_size=16)
    dm.prepare_data()
    assert tokens(dm.prepared) == tokens(reference["bpe"])


def split_documents(prepared, tokenizer):
    """The documents of each split, decoded (BPE: separated by <|endoftext|>)."""
    out = {}
    for split, ids in tokens(prepared).items():
        cuts = [-1] + [i for i, t in enumerate(ids) if t == tokenizer.eot_id] + [len(ids)]
        out[split] = [tokenizer.decode(ids[a + 1:b]) for a, b in zip(cuts, cuts[1:])]
    return out


def test_split_by_document_is_disjoint_deterministic_and_of_the_right_share(tmp_path, reference):
    ref = reference["bpe"]
    docs = split_documents(ref, ref.tokenizer())
    k = round(len(DOCS) * 0.1)
    assert len(docs["val"]) == k == ref.meta["split"]["documents"]["val"]
    assert len(docs["train"]) == len(DOCS) - k
    assert sorted(docs["train"] + docs["val"]) == sorted(DOCS)  # every document whole, once
    assert not set(docs["train"]) & set(docs["val"])
    # within a split the documents keep the corpus order
    assert docs["val"] == [d for d in DOCS if d in set(docs["val"])]
    # the same seed gives the same split; another seed another one
    again = prepare(as_text_files(tmp_path / "txt"), tmp_path / "again")
    assert tokens(again) == tokens(ref)
    other = prepare(tmp_path / "txt", tmp_path / "other", split_seed=1)
    assert other.directory != again.directory
    assert set(split_documents(other, ref.tokenizer())["val"]) != set(docs["val"])


def test_char_documents_are_separated_by_the_separator(tmp_path):
    docs = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    dm = TokenDataModule(path=str(path), data_dir=str(tmp_path), tokenizer="char", separator="|", block_size=2)
    dm.prepare_data()
    tok = dm.tokenizer
    train, val = (tok.decode(ids) for ids in tokens(dm.prepared).values())
    assert val in docs and sorted(train.split("|") + [val]) == sorted(docs)
    assert "|" in tok.chars


def test_few_documents_are_split_by_characters(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a" * 500, "b" * 500])  # 10% of 2 documents: none
    p = prepare(path, tmp_path / "out", "char")
    assert p.meta["split"]["by"] == "text" and p.meta["tokens"] == {"train": 900, "val": 101}


# -- a BPE trained on the training split ----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe_train")
    path = write_jsonl(root / "docs.jsonl")
    dm = TokenDataModule(path=str(path), data_dir=str(root), tokenizer="bpe_train", vocab_size=600,
                         special_tokens=["<|pad|>"], block_size=16)
    dm.prepare_data()
    return dm


def test_trained_bpe_round_trips_and_travels_in_the_state(trained, tmp_path):
    tok = trained.tokenizer
    assert isinstance(tok, TrainedBPETokenizer) and tok.vocab_size == 600 == trained.vocab_size
    assert tok.special_tokens == [ENDOFTEXT, "<|pad|>"]
    for text in ["First Citizen:\nBefore we proceed", "  spaces\t\ttabs\r\n", "Ünïcödé 😀 ✓ 中文", ""]:
        assert tok.decode(tok.encode(text)) == text
    # the prepared documents decode back exactly; a literal <|endoftext|> in a document stays text
    docs = split_documents(trained.prepared, tok)
    assert sorted(docs["train"] + docs["val"]) == sorted(DOCS)
    assert tok.encode(ENDOFTEXT) == [tok.eot_id]  # in a prompt it is the special token
    # the JSON travels in meta.json and in the state dict: a checkpoint needs nothing else
    state = trained.prepared.meta["tokenizer"]
    assert state == tok.state_dict() and state["kind"] == "bpe_train"
    again = tokenizer_from_state(json.loads(json.dumps(state)))
    assert again.encode(DOCS[3]) == tok.encode(DOCS[3])
    sizes = tok.token_bytes()
    ids = tok.encode(DOCS[3])
    assert sizes[ids].sum() == len(DOCS[3].encode()) and sizes[tok.eot_id] == 0


def test_trained_bpe_learns_from_the_training_documents_only(trained, tmp_path):
    tok = trained.tokenizer
    val = split_documents(trained.prepared, tok)["val"]
    # retrain on the training documents alone: the same tokenizer
    train_docs = [d for d in DOCS if d not in set(val)]
    alone = TrainedBPETokenizer.train(iter(train_docs), 600, ["<|pad|>"])
    assert alone.hf.get_vocab() == tok.hf.get_vocab()
    # and the cache is reused, tokenizer included
    dm = TokenDataModule(path=str(trained.paths[0]), data_dir=str(trained.data_dir), tokenizer="bpe_train",
                         vocab_size=600, special_tokens=["<|pad|>"], block_size=16)
    dm.prepare_data()
    assert dm.prepared.directory == trained.prepared.directory


def test_trained_bpe_exports_for_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = trained.tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.to_hf_files(tmp_path / "hf")))
    for text in [DOCS[3], DOCS[10], "Hello <|endoftext|> world <|pad|>!", "  x\n\n\ty 😀"]:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids) == text
    assert hf.eos_token_id == tok.eot_id


# -- bad input: one line each, nothing half-written ------------------------------------------------
def bad_jsonl(d):
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    return d / "bad.jsonl", r"bad\.jsonl line 3 is not JSON"


def missing_field(d):
    (d / "docs.jsonl").write_text('{"body": "x", "title": "y"}\n')
    return d / "docs.jsonl", r"docs\.jsonl line 1 has no field 'text' \(its fields: \['body', 'title'\]\)"


def not_an_object(d):
    (d / "docs.jsonl").write_text('["text"]\n')
    return d / "docs.jsonl", r"line 1 is a JSON list"


def not_utf8(d):
    (d / "latin.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    return d / "latin.jsonl", r"latin\.jsonl line 2 is not valid UTF-8"


def parquet_without_column(d):
    return write_parquet(d / "docs.parquet", field="body"), r"has no column 'text' \(its columns: \['id', 'body'\]\)"


def parquet_not_utf8(d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"fine", b"also fine", b"caf\xe9"], type=pa.binary())  # a writer that did not check
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())}), d / "latin.parquet",
                   row_group_size=2)  # the bad row opens the second row group: its row is of the file
    return d / "latin.parquet", r"latin\.parquet row 2: column 'text' is not valid UTF-8"


def not_parquet(d):
    (d / "docs.parquet").write_text("not parquet")
    return d / "docs.parquet", r"not a readable Parquet file"


def broken_gzip(d):
    (d / "docs.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    return d / "docs.jsonl.gz", r"docs\.jsonl\.gz is not a valid \.gz file"


def all_empty(d):
    write_jsonl(d / "docs.jsonl", ["", "", ""])
    return d / "docs.jsonl", r"has no text \(every document is empty\)"


def empty_folder(d):
    (d / "corpus").mkdir()
    (d / "corpus" / "notes.md").write_text("not a corpus file")
    return d / "corpus", r"holds no \.txt, \.jsonl\(\.gz/\.zst\) or \.parquet files"


BAD = {f.__name__: f for f in (bad_jsonl, missing_field, not_an_object, not_utf8, parquet_without_column, parquet_not_utf8,
                                 not_parquet, broken_gzip, all_empty, empty_folder)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, case):
    path, message = BAD[case](tmp_path)
    dm = TokenDataModule(path=str(path), data_dir=str(tmp_path / "cache"), tokenizer="bpe", block_size=2)
    with pytest.raises(DataError, match=message) as e:
        dm.prepare_data()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "prepared").exists() or not list((tmp_path / "cache" / "prepared").iterdir())


def test_saved_dataset_without_the_column_or_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["a", "b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"has no split 'test' \(its splits: \['train'\]\)"):
        prepare(Corpus(tmp_path / "dd", hf_split="test"), tmp_path / "out")
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: \['body'\]\)"):
        prepare(Corpus(tmp_path / "dd"), tmp_path / "out")


@pytest.mark.parametrize("settings, message", [
    ({"tokenizer": "bpe_train", "vocab_size": 256}, r"data\.vocab_size=256: a byte-level BPE needs at least 257"),
    ({"tokenizer": "bpe_train", "vocab_size": 257, "special_tokens": ["<|pad|>"]}, "at least 258"),
    ({"tokenizer": "bpe", "separator": "\n"}, r"data\.separator='\\n': applies to the char and word"),
    ({"text_field": ""}, r"data\.text_field='': must be a column name"),
    ({"path": []}, r"data\.path=\[\]: an empty list"),
])
def test_bad_corpus_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        TokenDataModule(**settings)


def test_meta_of_a_document_split_is_checked(trained):
    assert check_prepared(trained.prepared.directory) is None


def test_hub_dataset_unreachable_is_one_line(tmp_path):
    dm = TokenDataModule(hf_dataset="roneneldan/TinyStories", data_dir=str(tmp_path), tokenizer="bpe")
    with pytest.raises(DataError, match=r"could not reach the Hugging Face hub for data\.hf_dataset='roneneldan/"):
        dm.prepare_data()


def test_a_list_of_paths_from_the_command_line(tmp_path):
    import hydra

    from inprocess import compose_config

    a, b = write_jsonl(tmp_path / "a.jsonl", DOCS[:5]), write_parquet(tmp_path / "b.parquet", DOCS[5:10])
    cfg = compose_config(["data=text", f"data.path=[{a},{b}]", f"paths.data_dir={tmp_path}"])
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.paths == [a, b] and dm.tokenizer_spec == {"kind": "bpe", "encoding": "gpt2"}


def test_a_trained_bpe_checkpoint_samples_with_nothing_else(tmp_path):
    """train.py on JSONL with a trained BPE, then sample.py from the checkpoint alone."""
    import shutil

    import torch

    from conftest import TINY
    from inprocess import run_train, run_sample

    corpus = write_jsonl(tmp_path / "docs.jsonl")
    overrides = ["data=text", f"data.path={corpus}", "data.tokenizer=bpe_train", "data.vocab_size=300",
                 f"paths.data_dir={tmp_path / 'cache'}", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    run_train(overrides, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["hyper_parameters"]["tokenizer"]
    assert state["kind"] == "bpe_train" and tokenizer_from_state(state).vocab_size == 300
    shutil.rmtree(tmp_path / "cache")  # the prepared corpus (and its meta.json) is gone
    texts = run_sample([f"ckpt_path={ckpt}", "prompt='ROMEO: é'", "num_samples=1", "max_new_tokens=5", "device=cpu"])
    assert texts[0].startswith("ROMEO: é")


def test_streamed_datasets_are_read_a_batch_at_a_time():
    """The reader of hub datasets (streamed: an IterableDataset), on a local one."""
    import datasets

    from gptlab.data.records import BATCH_ROWS, dataset_texts

    docs = DOCS * 3
    rows = []
    stream = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).to_iterable_dataset()
    assert list(dataset_texts(stream, "text", "stream", rows.append)) == docs
    assert sum(rows) == len(docs) and max(rows) == BATCH_ROWS
    with pytest.raises(DataError, match=r"stream has no column 'body' \(its columns: \['text', 'n'\]\)"):
        next(dataset_texts(stream, "body", "stream", rows.append))
