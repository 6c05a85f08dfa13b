"""Bad input: each case exits non-zero with a short message naming the value and the fix, no
traceback, and no partial files (issue: reliability and security)."""


import pytest

from conftest import SHAKESPEARE, run_script, train_args


def _fails(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


def _train_fails(tmp_path, data_dir, args, *needles, corpus=SHAKESPEARE, steps=2):
    run_dir = tmp_path / "run"
    proc = run_script("train.py", train_args(run_dir, *args, f"trainer.max_steps={steps}")[1:] + [f"data.path={corpus}"],
                      data_dir, check=False)
    _fails(proc, *needles)
    assert not run_dir.exists(), f"left behind: {list(run_dir.rglob('*'))}"
    return proc


def test_n_embd_not_divisible_by_n_head(tmp_path, data_dir):
    _train_fails(tmp_path, data_dir, ["model.n_embd=100", "model.n_head=3"], "model.n_embd=100", "model.n_head=3")


def test_block_size_larger_than_validation_split(tmp_path, data_dir):
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:5000])
    _train_fails(tmp_path, data_dir, ["model.block_size=600"], "block_size=600", "validation split", corpus=small)


def test_unknown_tokenizer(tmp_path, data_dir):
    _train_fails(tmp_path, data_dir, ["data.tokenizer=sentencepiece"], "data.tokenizer='sentencepiece'", "char")


def test_unknown_bpe_encoding(tmp_path, data_dir):
    _train_fails(tmp_path, data_dir, ["data.tokenizer=bpe", "data.encoding=gpt5"], "'gpt5'", "cl100k_base")


def test_config_key_that_does_not_exist(tmp_path, data_dir):
    proc = _train_fails(tmp_path, data_dir, ["model.n_layers=3"], "n_layers")
    assert "not in struct" in proc.stderr
    # added with '+', the typed model config still refuses it and lists the valid keys
    _train_fails(tmp_path, data_dir, ["+model.n_layers=3"], "unknown key(s) ['n_layers']", "n_layer")


@pytest.mark.parametrize("kind", ["missing", "empty", "binary", "latin1"])
def test_bad_corpus(tmp_path, data_dir, kind):
    corpus = tmp_path / f"{kind}.txt"
    needle = {"missing": "corpus not found", "empty": "is empty", "binary": "looks binary",
              "latin1": "not valid UTF-8"}[kind]
    if kind == "empty":
        corpus.write_text("")
    elif kind == "binary":
        corpus.write_bytes(bytes(range(256)) * 40)
    elif kind == "latin1":
        corpus.write_bytes("Très bien, monsieur.\n".encode("latin-1") * 100)
    _train_fails(tmp_path, data_dir, [], needle, str(corpus), corpus=corpus)


def test_resume_checkpoint_missing(tmp_path, data_dir):
    _train_fails(tmp_path, data_dir, [f"ckpt_path={tmp_path}/nope.ckpt"], "nope.ckpt", "no such file")


def test_resume_checkpoint_from_a_different_vocabulary(tmp_path, data_dir, trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    before = sorted(p.name for p in ckpt.parent.iterdir())
    _train_fails(tmp_path, data_dir, [f"ckpt_path={ckpt}", "data.tokenizer=bpe"], "different vocabulary", "65 characters",
                 steps=40)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before


def _sample_fails(data_dir, args, *needles):
    proc = run_script("sample.py", [*args, "device=cpu", "max_new_tokens=5"] if not any(
        a.startswith("max_new_tokens") for a in args) else [*args, "device=cpu"], data_dir, check=False)
    _fails(proc, *needles)


def test_sample_checkpoint_missing(tmp_path, data_dir):
    _sample_fails(data_dir, [f"ckpt_path={tmp_path}/missing.ckpt"], "checkpoint not found", "missing.ckpt")


def test_sample_checkpoint_truncated(tmp_path, data_dir, trained_run):
    data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    _sample_fails(data_dir, [f"ckpt_path={bad}"], "not a readable checkpoint", "truncated")


def test_sample_not_a_checkpoint(tmp_path, data_dir):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("these are my notes, not a model\n")
    _sample_fails(data_dir, [f"ckpt_path={bad}"], "not a PyTorch checkpoint file")
    import torch

    other = tmp_path / "tensors.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    _sample_fails(data_dir, [f"ckpt_path={other}"], "not a gptlab/Lightning checkpoint")


def test_sample_prompt_outside_char_vocabulary(tmp_path, data_dir, trained_run):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Ça ira ~ {ok}", encoding="utf-8")
    _sample_fails(data_dir, [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"prompt=FILE:{prompt}"],
                  "outside this model's vocabulary", "Ç", "{")


@pytest.mark.parametrize(
    "arg, needle",
    [("max_new_tokens=0", "max_new_tokens=0"), ("temperature=-0.5", "temperature=-0.5"),
     ("top_k=0", "top_k=0"), ("top_p=1.5", "top_p=1.5"), ("top_p=0", "top_p=0")],
)
def test_sample_bad_generation_arguments(data_dir, trained_run, arg, needle):
    _sample_fails(data_dir, [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", arg], needle)


def test_output_directory_not_writable(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_script("train.py", [f"data.path={SHAKESPEARE}", f"hydra.run.dir={blocker}/run"], data_dir, check=False)
    _fails(proc, "cannot write the output directory", str(blocker))
