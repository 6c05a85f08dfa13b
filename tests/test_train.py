"""End to end through train.py and sample.py: what a run writes, sampling it, a BPE run, defaults that
work for any corpus; and a few subprocess smoke tests of the command lines themselves (one-line errors,
exit status, no debris)."""

import math

import pytest
import torch

from gptlab.data import TokenDataModule
from gptlab.data.datasets import FixedWindows

from conftest import SHAKESPEARE, TINY, read_scalars, read_texts, train_args
from inprocess import run_main, run_sample, run_train


def test_run_writes_checkpoints_config_and_tensorboard(trained_run):
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("best-step*.ckpt"))) == 1
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)  # plain containers only
    assert ckpt["global_step"] == 20
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["n_layer"] == 2 and hp["model"]["vocab_size"] == 65
    assert "compile" not in hp["model"] and "init_from" not in hp["model"]  # the shape only
    assert hp["tokenizer"]["kind"] == "char" and len(hp["tokenizer"]["chars"]) == 65
    assert ckpt["TokenDataModule"]["next_train_batch"] == 20

    scalars = read_scalars(trained_run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(20))
    assert len(scalars["val/loss"]) == 2  # steps 10 and 20
    assert any(tag.startswith("lr") for tag in scalars)
    first, last = scalars["train/loss"][0][1], scalars["train/loss"][-1][1]
    assert first > 4.0 and last < first  # starts near ln(65) = 4.17 and learns
    val = scalars["val/loss"][-1][1]
    ppl = scalars["val/ppl"][-1][1]
    assert abs(ppl - torch.exp(torch.tensor(val)).item()) < 1e-3 * ppl
    assert scalars["train/tokens"][-1][1] == 20 * 8 * 32  # steps x batch x block
    # bits per byte: tiny Shakespeare is ASCII, one byte per character token
    bpb = scalars["val/bpb"][-1][1]
    assert bpb == pytest.approx(val / math.log(2), rel=1e-5)
    # the last logged values travel in the checkpoint (a requeued finished run reports them)
    assert ckpt["gptlab"]["metrics"]["val/loss"] == pytest.approx(val, abs=1e-6)
    texts = read_texts(trained_run / "tensorboard")
    assert len(texts) == 2 and all(len(t.strip()) > 10 for _, t in texts)


def test_sample_prints_requested_characters(trained_run):
    texts = run_sample([f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
                        "max_new_tokens=50", "device=cpu"])
    assert len(texts) == 2
    assert all(len(t) == 1 + 50 and t[0] == "\n" for t in texts)  # the default start token + 50 chars


def test_a_corpus_without_newline_trains_and_samples_with_the_defaults(tmp_path, data_dir):
    """The text sample and sample.py start from a token the vocabulary has (here: no newline, no end-of-text)."""
    corpus = tmp_path / "x.txt"
    corpus.write_text("to be or not " * 500)
    run = tmp_path / "run"
    run_train([f"data.path={corpus}", *TINY, "model.block_size=16", "trainer.max_steps=4",
               "trainer.val_check_interval=2"], run)
    assert len(read_texts(run / "tensorboard")) == 2
    texts = run_sample([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=1", "max_new_tokens=10"])
    assert len(texts[0]) == 11 and set(texts[0]) <= set("to ber n")


def test_bpe_corpus_trains_and_samples(data_dir, tmp_path):
    run = tmp_path / "bpe"
    run_train([f"data.path={SHAKESPEARE}", *TINY, "data=shakespeare_bpe", "trainer.max_steps=4",
               "trainer.val_check_interval=2"], run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["tokenizer"] == {"kind": "bpe", "encoding": "gpt2"}
    assert ckpt["hyper_parameters"]["model"]["vocab_size"] == 50257
    texts = run_sample([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=1", "max_new_tokens=8",
                        "prompt=ROMEO:", "device=cpu"])
    assert texts[0].startswith("ROMEO:")
    # val/bpb = val/loss / ln 2 x tokens / bytes over the same validation windows
    dm = TokenDataModule(path=str(SHAKESPEARE), data_dir=str(data_dir), tokenizer="bpe", block_size=32,
                         batch_size=8, val_windows=32)
    dm.setup()
    targets = torch.stack([y for _, y in FixedWindows(dm.val_tokens, 32, 32)])
    n_bytes = int(dm.tokenizer.token_bytes()[targets.numpy()].sum())
    scalars = read_scalars(run / "tensorboard")
    expected = scalars["val/loss"][-1][1] / math.log(2) * targets.numel() / n_bytes
    assert scalars["val/bpb"][-1][1] == pytest.approx(expected, rel=1e-4)


# -- the command lines: train.py's and sample.py's main, Hydra and error handling included -----------------
def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_train_py_bad_input_is_one_line_and_leaves_no_run_directory(tmp_path, data_dir, capfd):
    """(Each kind of bad value is tested in-process, test_config.py; this is the command line's side.)"""
    run_dir = tmp_path / "run"
    code = run_main(train_args(run_dir, "trainer.max_steps=abc"))
    _one_line_error(code, capfd.readouterr().err, "trainer.max_steps='abc': expected an integer")
    assert not run_dir.exists(), f"left behind: {list(run_dir.rglob('*'))}"


def test_sample_py_reports_a_mistake_in_one_line(data_dir, capfd):
    """(Sampling itself runs in-process above; this is sample.py's main, Hydra and error handling included.)"""
    _one_line_error(run_main([], name="sample"), capfd.readouterr().err, "no checkpoint: pass ckpt_path=")


@pytest.mark.parametrize("override, message", [
    ("temperature=abc", "temperature='abc': expected a number"),
    ("top_k=0", "top_k=0: must be >= 1"),
    ("device=cuda:7", "device=cuda:7: this machine has"),
    ("prompt=FILE:{latin1}", "is not UTF-8 text (byte offset 3)"),
    ("prompt=FILE:{missing}", "prompt file not found"),
])
def test_sample_mistakes_are_one_line(trained_run, tmp_path, override, message):
    from gptlab.errors import GptlabError

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1") + b"\xff")
    override = override.format(latin1=latin1, missing=tmp_path / "nope.txt")
    with pytest.raises(GptlabError) as info:
        run_sample([f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "max_new_tokens=4", override])
    assert message in str(info.value) and "\n" not in str(info.value)
