"""The prepared-corpus cache under concurrency and damage (gptlab.data)."""

import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.data.prepare import check_prepared, corpus_files, prepare_corpus

from conftest import SHAKESPEARE, env_for


PREPARE = """
import sys
from pathlib import Path
from gptlab.data.prepare import corpus_files, prepare_corpus
p = prepare_corpus(corpus_files(Path(sys.argv[1])), {"kind": "bpe", "encoding": "gpt2"}, Path(sys.argv[2]),
                   workers=1, log=lambda *a: None)
print(p.directory, p.meta["tokens"]["train"])
"""


def test_two_processes_prepare_the_same_corpus(tmp_path, data_dir):
    corpus = tmp_path / "big.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 4)
    out = tmp_path / "prepared"
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, str(corpus), str(out)], env=env_for(data_dir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    lines = {r[0].strip() for r in results}
    assert len(lines) == 1  # same directory, same token count
    directory = Path(lines.pop().split()[0])
    assert check_prepared(directory) is None
    assert [p.name for p in out.iterdir()] == [directory.name]  # no temporary directories left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    files = corpus_files(SHAKESPEARE)
    first = prepare_corpus(files, {"kind": "char"}, tmp_path, log=lambda *a: None)
    train = first.directory / "train.bin"
    good = train.read_bytes()
    if damage == "truncate":
        train.write_bytes(good[: len(good) // 3])
    else:
        train.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    assert check_prepared(first.directory) is not None
    messages = []
    again = prepare_corpus(files, {"kind": "char"}, tmp_path, log=messages.append)
    assert any("damaged" in m for m in messages)
    assert again.directory == first.directory and train.read_bytes() == good
