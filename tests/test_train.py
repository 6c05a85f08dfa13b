"""End to end through train.py and sample.py as a user runs them (subprocesses, real files)."""

import shutil

import torch

from conftest import read_scalars, read_texts, run_script, train_args


def test_run_writes_checkpoints_config_and_tensorboard(trained_run):
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("best-step*.ckpt"))) == 1
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)  # plain containers only
    assert ckpt["global_step"] == 20
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["n_layer"] == 2 and hp["model"]["vocab_size"] == 65
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
    texts = read_texts(trained_run / "tensorboard")
    assert len(texts) == 2 and all(len(t.strip()) > 10 for _, t in texts)


def test_sample_prints_requested_characters(trained_run, data_dir):
    proc = run_script(
        "sample.py",
        [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "num_samples=2", "max_new_tokens=50", "device=cpu"],
        data_dir,
    )
    samples = proc.stdout.split("\n---------------\n")
    samples = [s for s in samples if s]
    assert len(samples) == 2
    assert all(len(s) == 1 + 50 for s in samples), [len(s) for s in samples]  # the "\n" prompt + 50 chars


def test_resume_continues_step_count_and_tensorboard_run(trained_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    run_script(
        "train.py",
        train_args(tmp_path / "new-invocation", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                   "trainer.max_steps=30", "trainer.val_check_interval=10"),
        data_dir,
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30
    assert ckpt["TokenDataModule"]["next_train_batch"] == 30
    # the same TensorBoard run continues: steps 0..29 once each
    scalars = read_scalars(run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(30))
    assert [s for s, _ in scalars["val/loss"]] == [9, 19, 29]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_bpe_corpus_trains_and_samples(data_dir, tmp_path):
    run = tmp_path / "bpe"
    run_script("train.py", train_args(run, "data=shakespeare_bpe", "trainer.max_steps=4",
                                      "trainer.val_check_interval=2"), data_dir)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["tokenizer"] == {"kind": "bpe", "encoding": "gpt2"}
    assert ckpt["hyper_parameters"]["model"]["vocab_size"] == 50257
    proc = run_script("sample.py", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=1",
                                    "max_new_tokens=8", "prompt=ROMEO:", "device=cpu"], data_dir)
    assert proc.stdout.startswith("ROMEO:")
