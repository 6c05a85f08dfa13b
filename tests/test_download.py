"""`python -m gptlab.data.download`: resumable downloads (HTTP Range) against a file server on 127.0.0.1,
checks of the finished file, and the one-line offline message. Nothing here touches the network."""

import numpy as np
import pytest

from gptlab.data.catalog import CATALOG, Entry, download_corpus, fetch, files_of
from gptlab.data.shards import write_shard
from gptlab.errors import DataError

from conftest import RangeHandler


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, http_server):
    served, base = http_server
    whole = write_shard(served / "fineweb_train_000001.bin", np.arange(5000) % 50257).read_bytes()
    dest = tmp_path / "out" / "fineweb_train_000001.bin"
    dest.parent.mkdir()
    (dest.parent / (dest.name + ".part")).write_bytes(whole[:3000])  # what a killed download left
    fetch(f"{base}/{dest.name}", dest, progress=False)
    assert dest.read_bytes() == whole and RangeHandler.ranges == ["bytes=3000-"]
    assert not (dest.parent / (dest.name + ".part")).exists()
    # a part that is already whole: the server answers 416, and the file is checked and kept
    dest.rename(dest.parent / (dest.name + ".part"))
    fetch(f"{base}/{dest.name}", dest, progress=False)
    assert dest.read_bytes() == whole


def test_a_bad_download_is_refused_and_not_kept(tmp_path, http_server):
    served, base = http_server
    (served / "cut.bin").write_bytes(write_shard(tmp_path / "x.bin", np.arange(100)).read_bytes()[:-10])
    with pytest.raises(DataError, match="cut.bin.part is truncated or damaged.*run again to fetch it anew"):
        fetch(f"{base}/cut.bin", tmp_path / "cut.bin", progress=False)
    assert not list(tmp_path.glob("cut.bin*"))
    (served / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="a.txt.part: sha256 2cf24.*, the publisher states 00"):
        fetch(f"{base}/a.txt", tmp_path / "a.txt", sha256="00" * 32, progress=False)


def test_the_checksum_the_hub_states_is_checked(tmp_path, http_server):
    """A Hugging Face Hub `resolve` URL redirects to storage stating the file's sha256 (X-Linked-Etag)."""
    import hashlib

    served, base = http_server
    (served / "a.txt").write_text("hello")
    RangeHandler.stated = {"a.txt": hashlib.sha256(b"hello").hexdigest(), "b.txt": "ab" * 32}
    assert fetch(f"{base}/resolve/a.txt", tmp_path / "a.txt", progress=False).read_text() == "hello"
    (served / "b.txt").write_text("not what was stated")
    with pytest.raises(DataError, match=f"b.txt.part: sha256 [0-9a-f]{{64}}, the publisher states {'ab' * 32}; "
                                        "removed it, run again"):
        fetch(f"{base}/resolve/b.txt", tmp_path / "b.txt", progress=False)
    assert not list(tmp_path.glob("b.txt*"))


def test_offline_one_line_says_what_to_fetch_and_where(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = Entry(f"http://127.0.0.1:{port}/", ("val.bin",), "train_%02d.bin", 1, 9, None, "")
    with pytest.raises(DataError) as info:
        download_corpus("x", 4, tmp_path, progress=False, catalog={"x": entry})
    message = str(info.value)
    assert "\n" not in message and f"put them in {tmp_path / 'x'}/" in message
    assert "5 file(s) (val.bin, train_01.bin, ... train_04.bin)" in message
    assert files_of(CATALOG["fineweb10B"], 2) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                                  "fineweb_train_000002.bin"]
    assert len(files_of(CATALOG["fineweb10B"], None)) == 104
    with pytest.raises(DataError, match="--shards 20: the publisher has 14"):
        files_of(CATALOG["fineweb-edu"], 20)
