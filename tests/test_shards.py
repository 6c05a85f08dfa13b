"""Token shards read as they are (llm.c / modded-nanogpt headers, nanoGPT's raw files) and weighted
mixtures of sources: the reader's checks, windows and shard boundaries, a run from shards equal to the
same tokens prepared from text, mixture draws by weight, per-source validation in TensorBoard and CSV,
and a mixture run killed with SIGKILL and resumed equal to an uninterrupted one."""

import csv

import numpy as np
import pytest
import torch

from gptlab.data import TokenDataModule
from gptlab.data.datasets import ArrayWindows, TrainBatches
from gptlab.data.shards import HEADER_BYTES, TokenShards, read_header, shard_files, write_shard
from gptlab.errors import ConfigError, DataError
from gptlab.report.collect import read_job
from gptlab.report.write import text_table

from conftest import SHAKESPEARE, TINY, kill_after_checkpoint, read_scalars
from inprocess import run_train

SHORT = [*TINY, "data.tokenizer=bpe", "data.url=null", "data.val_windows=16", "callbacks.text_sample.max_new_tokens=4"]


def test_reader_reads_both_header_kinds_and_nanogpt_raw_files(tmp_path):
    ids = np.arange(1000) * 7 % 50257
    gpt2 = read_header(write_shard(tmp_path / "a.bin", ids))
    assert (gpt2.kind, gpt2.dtype, gpt2.tokens, gpt2.offset) == ("gpt2", np.dtype("<u2"), 1000, HEADER_BYTES)
    big = np.arange(1000) * 131 % 128256  # ids above 65535: uint32
    llama = read_header(write_shard(tmp_path / "b.bin", big, kind="llama3"))
    assert (llama.kind, llama.dtype, llama.tokens) == ("llama3", np.dtype("<u4"), 1000)
    assert TokenShards([tmp_path / "b.bin"]).gather(np.array([0, 990]), 9).tolist() == [big[:10].tolist(), big[990:].tolist()]
    ids.astype("<u2").tofile(tmp_path / "train.bin")  # nanoGPT: no header
    raw = read_header(tmp_path / "train.bin")
    assert (raw.kind, raw.offset, raw.tokens) == ("gpt2", 0, 1000)
    assert np.array_equal(TokenShards([tmp_path / "train.bin"]).tokens(0), ids)


def _damaged(tmp_path, what):
    path = write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100))
    data = bytearray(path.read_bytes())
    if what == "magic":
        data[0:4] = np.int32(20240521).tobytes()
    elif what == "version":
        data[4:8] = np.int32(2).tobytes()
    else:
        del data[-3:]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("what, needle", [("magic", "magic 20240521 is not llm.c's"), ("version", "version 2, expected 1"),
                                          ("truncated", "truncated or damaged: 1221 bytes")])
def test_reader_refuses_a_damaged_shard_naming_it(tmp_path, what, needle):
    path = _damaged(tmp_path, what)
    with pytest.raises(DataError, match=needle) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_windows_stay_inside_a_shard_and_few_files_stay_open(tmp_path):
    parts = [np.arange(n) + 1000 * i for i, n in enumerate([50, 8, 30, 61, 40])]  # the 8-token shard offers no window
    files = [write_shard(tmp_path / f"s{i:02d}.bin", p) for i, p in enumerate(parts)]
    shards = TokenShards(shard_files(str(tmp_path / "s*.bin")), max_open=2)
    block = 9
    expected = [p[j : j + block + 1] for p in parts for j in range(len(p) - block)]
    assert shards.n_starts(block) == len(expected)
    rows = shards.gather(np.arange(len(expected)), block)
    assert np.array_equal(rows, np.array(expected)) and len(shards._open) <= 2
    assert shard_files(tmp_path) == files  # a directory: its .bin files in order
    with pytest.raises(DataError, match="matches no file"):
        shard_files(str(tmp_path / "nothing_*.bin"))


def test_shard_token_ids_and_kind_must_fit_the_tokenizer(tmp_path, data_dir):
    write_shard(tmp_path / "t_000001.bin", [1, 2, 3] * 100)
    val = write_shard(tmp_path / "v.bin", [5, 50256, 60000] * 100)
    with pytest.raises(DataError, match=f"{val} holds token id 60000, outside the tokenizer's vocabulary of 50257"):
        TokenDataModule(path=str(tmp_path / "t_*.bin"), val_path=str(val), tokenizer="bpe", block_size=8).prepare_data()
    with pytest.raises(ConfigError, match="holds gpt2 tokens but data.tokenizer is .*char"):
        TokenDataModule(path=str(tmp_path / "t_*.bin"), val_path=str(val), block_size=8).prepare_data()
    with pytest.raises(ConfigError, match="data.val_path is not set: token shards need a validation set"):
        TokenDataModule(path=str(tmp_path / "t_*.bin"), tokenizer="bpe", block_size=8).prepare_data()
    write_shard(tmp_path / "l.bin", [1, 2, 3] * 100, kind="llama3")
    with pytest.raises(DataError, match="holds llama3 tokens; gptlab has no llama3 tokenizer"):
        TokenDataModule(path=str(tmp_path / "l.bin"), val_path=str(tmp_path / "l.bin"), tokenizer="bpe",
                        block_size=8).prepare_data()


@pytest.fixture(scope="module")
def shakespeare_shards(tmp_path_factory, data_dir):
    """Tiny Shakespeare's GPT-2 tokens as gptlab prepares them, written as llm.c shards (train in 3 pieces)."""
    dm = TokenDataModule(path=str(SHAKESPEARE), tokenizer="bpe", block_size=32)
    dm.prepare_data()
    d = tmp_path_factory.mktemp("shards")
    train = np.asarray(dm.prepared.tokens("train"))
    write_shard(d / "play_train_000001.bin", train)
    write_shard(d / "play_val_000000.bin", np.asarray(dm.prepared.tokens("val")))
    # a second source of other tokens: the same text read backwards
    write_shard(d / "back_train_000001.bin", train[::-1])
    write_shard(d / "back_val_000000.bin", np.asarray(dm.prepared.tokens("val"))[::-1])
    return d


def test_a_run_from_shards_equals_the_same_tokens_prepared_from_text(tmp_path, shakespeare_shards):
    d, args = shakespeare_shards, [*SHORT, "trainer.max_steps=4", "trainer.val_check_interval=4"]
    text = run_train([f"data.path={SHAKESPEARE}", *args], tmp_path / "text")
    shards = run_train([f"data.path={d}/play_train_*.bin", f"data.val_path={d}/play_val_000000.bin", *args],
                       tmp_path / "shards")
    assert shards == text  # identical tokens, windows and loss


def test_mixture_draws_follow_the_weights_and_the_seed():
    # zero-stride arrays: a billion start offsets per source at no memory cost
    sources = [ArrayWindows(np.broadcast_to(np.uint16(i), (10**9,))) for i in range(3)]
    weights = [5, 3, 2]
    sampler = TrainBatches(sources, 16, 8, seed=3, weights=weights)
    drawn = np.concatenate([sampler.draw(k)[0] for k in range(2000)])  # 16,000 windows
    share = np.bincount(drawn, minlength=3) / len(drawn)
    # binomial standard deviation of a share over 16,000 draws: <= 0.004; allow 5 of them
    assert np.allclose(share, np.array(weights) / 10, atol=0.02)
    again = TrainBatches(sources, 16, 8, seed=3, weights=weights)
    assert all(np.array_equal(np.stack(sampler.draw(k)), np.stack(again.draw(k))) for k in range(50))
    x, _, _ = sampler.batch(7)
    assert torch.equal(x[:, 0], torch.from_numpy(sampler.draw(7)[0]))  # each window comes from its drawn source
    # two DDP ranks: the same pure function with the rank, never the same window
    ranks = [TrainBatches(sources, 16, 8, seed=3, rank=r, world_size=2, weights=weights) for r in (0, 1)]
    windows = [{pair for k in range(200) for pair in zip(*ranks[r].draw(k))} for r in (0, 1)]
    assert len(windows[0]) == len(windows[1]) == 1600 and not windows[0] & windows[1]


def test_mixture_settings_are_checked(tmp_path, shakespeare_shards):
    d = shakespeare_shards
    play = {"path": f"{d}/play_train_*.bin", "val_path": f"{d}/play_val_000000.bin"}

    def prepare(mix, **kw):
        TokenDataModule(path=None, url=None, mix=mix, tokenizer=kw.pop("tokenizer", "bpe"), block_size=8, **kw).prepare_data()

    cases = [
        ({"a": {**play, "weight": 0}, "b": {**play, "weight": 1}}, "data.mix.a.weight=0: must be > 0"),
        ({"a": {**play, "weight": 0}, "b": {**play, "weight": 0}}, "every weight is 0"),
        ({"a": {**play, "weight": -1}}, "data.mix.a.weight=-1: must be > 0"),
        ({"a": play, "cod": {"weight": 0.5}}, r"data.mix.cod has no path: not one of the mixture's sources \['a'\]"),
        ({"a": {"path": f"{d}/nope_*.bin", "val_path": play["val_path"]}}, "data.mix.a.path=.*matches no file"),
        ({"a": {"path": play["path"]}}, "data.mix.a.val_path is not set"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append(({"a": play, "e": {"path": str(empty)}}, "is empty"))
    for mix, needle in cases:
        with pytest.raises((ConfigError, DataError), match=needle):
            prepare(mix)
    with pytest.raises(ConfigError, match="data.mix needs one fixed vocabulary"):
        prepare({"a": play}, tokenizer="char")


MIX_ARGS = [*SHORT, "logger=[tensorboard,csv]", "trainer.max_steps=8", "trainer.val_check_interval=4"]


def mix_override(d, play_weight=3):
    return (f"data.mix={{play: {{path: '{SHAKESPEARE}', weight: {play_weight}}}, "
            f"back: {{path: '{d}/back_train_*.bin', val_path: '{d}/back_val_000000.bin', weight: 1}}}}")


@pytest.mark.slow  # a SIGKILL'd train.py subprocess
def test_mixture_run_validates_each_source_and_resumes_exactly_after_sigkill(tmp_path, data_dir, shakespeare_shards):
    reference = tmp_path / "reference"
    run_train([mix_override(shakespeare_shards), *MIX_ARGS], reference)
    tb = read_scalars(reference / "tensorboard")
    rows = list(csv.DictReader((reference / "csv" / "metrics.csv").open()))
    val_rows = [r for r in rows if r.get("val/loss")]
    assert [int(r["step"]) for r in val_rows] == [3, 7]
    for tag in ("val/loss", "val/loss/play", "val/loss/back", "val/bpb/play", "val/bpb/back"):
        assert [round(v, 4) for _, v in tb[tag]] == [round(float(r[tag]), 4) for r in val_rows]
    play, back, overall = (tb[t][-1][1] for t in ("val/loss/play", "val/loss/back", "val/loss"))
    assert play != back and overall == pytest.approx((play + back) / 2, abs=1e-5)  # 16 windows of each
    drawn = {n: tb[f"train/tokens/{n}"][-1][1] for n in ("play", "back")}
    assert sum(drawn.values()) == tb["train/tokens"][-1][1] == 8 * 8 * 32
    assert tb["train/epochs/back"][-1][1] == pytest.approx(drawn["back"] / 301_966)
    table = text_table([read_job(reference)])  # the sweep report's table: each source's final loss
    assert "val/loss/back" in table and f"{back:.4f}" in table

    # train.py killed with SIGKILL after a periodic checkpoint, resumed from it: the uninterrupted run
    crashed = tmp_path / "crashed"
    periodic = ["callbacks.periodic_checkpoint.every_n_train_steps=2", "callbacks.periodic_checkpoint.save_top_k=-1"]
    newest = kill_after_checkpoint(crashed, [mix_override(shakespeare_shards), *MIX_ARGS, *periodic,
                                             f"hydra.run.dir={crashed}"], data_dir, step=2)
    resumed_at = int(newest.stem[4:])
    assert 2 <= resumed_at < 8
    run_train([mix_override(shakespeare_shards), *MIX_ARGS, *periodic, f"ckpt_path={newest}"], tmp_path / "elsewhere")
    got = read_scalars(crashed / "tensorboard")
    assert [s for s, _ in got["train/loss"]] == list(range(8))  # every step once, in the killed run's TensorBoard run
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in tb["train/loss"]], rtol=0, atol=1e-6)
    for tag in ("val/loss", "val/loss/play", "val/loss/back"):
        assert got[tag][-1][1] == pytest.approx(tb[tag][-1][1], abs=1e-6)
    # the batches drawn before and after the resume: each step's tokens from each source, as without the kill
    for tag in ("train/tokens/play", "train/tokens/back"):
        assert got[tag] == tb[tag] and len(tb[tag]) == 8
    state = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["TokenDataModule"]
    assert state["next_train_batch"] == 8 and sum(state["source_tokens"].values()) == 8 * 8 * 32


def test_the_fineweb_baseline_preset_is_llmc_gpt2_124m():
    from inprocess import compose_config

    cfg = compose_config(["experiment=gpt2_124m_fineweb"])
    t = cfg.trainer
    assert cfg.data.batch_size * cfg.model.block_size * t.accumulate_grad_batches * t.devices == 524_288
    assert abs(t.max_steps * 524_288 - 10e9) < 1e-3 * 10e9 and (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (6e-4, 0.0, 700)
    assert cfg.data.path.endswith("fineweb10B/fineweb_train_*.bin") and cfg.data.val_path.endswith("fineweb_val_000000.bin")

