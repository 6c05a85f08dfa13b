"""Downstream evaluation (gptlab.eval): native scores equal lm-evaluation-harness's `hf` model on
gptlab's Hugging Face export, the adapter equals it too, every tokenizer evaluates, and bad input is
one line. Task files are small made-up items in the official formats, written by the tests; the
harness reads them through local task configs (`dataset_path: json`), offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptlab.data.tokenizers import BPETokenizer, CharTokenizer
from gptlab.errors import ConfigError, DataError
from gptlab.eval import load_task, score_task
from gptlab.eval.metrics import evaluate_task, item_metrics
from gptlab.models import build_model

from eval_items import TRAIN_CHOICE, TRAIN_CLOZE, native, write_jsonl  # noqa: F401

pytest.importorskip("transformers")

HELLASWAG = [
    {"ind": 1, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "x"},
    {"ind": 2, "activity_label": "Baking cookies", "ctx_a": "[header] How to bake cookies [title] Preheat the oven.",
     "ctx_b": "then [step] mix the FLOUR", "ctx": "x", "split": "val", "split_type": "zeroshot", "label": "1",
     "endings": ["and sugar [substeps] in a bowl.", "with  the eggs.", "into the sink.", "quickly, then wait."],
     "source_id": "y"},
    {"ind": 3, "activity_label": "Long story", "ctx_a": " ".join(["the dog ran around the yard again"] * 12) + ".",
     "ctx_b": "it", "ctx": "x", "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["was tired.", "sat down on the grass and slept for a long long time.", "ate.", "barked!"],
     "source_id": "z"},
]
LAMBADA = [{"text": "she opened the door and saw her old friend standing there , smiling at her"},
           {"text": "the cat sat on the mat and looked at the dog"},
           {"text": " ".join(["one two three four five six"] * 14) + " seven"}]
CHOICE = [{"context": "The sky is ", "choices": ["blue.", "green.", "made of cheese."], "label": 0},
          {"context": "2 + 2 =", "choices": ["4", "5"], "label": 1}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval-tasks")
    (d / "eval").mkdir()
    # made-up files where the built-in tasks' official ones go: read by path (their sha256 is not the official one)
    write_jsonl(d / "eval" / "hellaswag_val.jsonl", HELLASWAG)
    write_jsonl(d / "eval" / "lambada_test.jsonl", LAMBADA)
    write_jsonl(d / "choice.jsonl", CHOICE)
    return d


# ----------------------------------------------------------------------------------------------
# equal to lm-evaluation-harness's `hf` model on gptlab's Hugging Face export

GPT2_SHAPE = dict(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=16)
LLAMA_SHAPE = dict(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope", norm="rmsnorm",
                   mlp="swiglu", bias=False, tie_weights=False)


def random_model(shape: dict, seed: int):
    """A random model whose logits differ enough between tokens for the choices to differ."""
    torch.manual_seed(seed)
    model = build_model(shape)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model.eval()


def trained_bpe():
    from gptlab.data.trained_bpe import TrainedBPETokenizer

    text = " ".join(json.dumps(r) for r in HELLASWAG + LAMBADA + CHOICE)
    return TrainedBPETokenizer.train([text] * 3, vocab_size=300)


def harness_configs(directory: Path, files: dict[str, Path]) -> Path:
    """Local harness task configs over the test's files: the harness's own hellaswag preprocessing
    (its utils.py), lambada_openai's context/target split, and a plain multiple-choice task."""
    import lm_eval

    inc = directory / "harness"
    inc.mkdir()
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py", inc / "utils.py")
    common = "dataset_path: json\nmetric_list:\n  - metric: acc\n"
    (inc / "t_hellaswag.yaml").write_text(
        f"task: t_hellaswag\n{common}  - metric: acc_norm\noutput_type: multiple_choice\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {files['hellaswag']}\nvalidation_split: validation\n"
        "process_docs: !function utils.process_docs\ndoc_to_text: '{{query}}'\ndoc_to_target: '{{label}}'\n"
        "doc_to_choice: choices\n")
    (inc / "t_lambada.yaml").write_text(
        f"task: t_lambada\n{common}  - metric: perplexity\noutput_type: loglikelihood\n"
        f"dataset_kwargs:\n  data_files:\n    test: {files['lambada']}\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n")
    (inc / "t_choice.yaml").write_text(
        f"task: t_choice\n{common}  - metric: acc_norm\noutput_type: multiple_choice\n"
        f"dataset_kwargs:\n  data_files:\n    test: {files['choice']}\ntest_split: test\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\n")
    return inc


HARNESS_TASKS = {"t_hellaswag": "hellaswag", "t_lambada": "lambada", "t_choice": "choice"}


def run_harness(lm, include: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=list(HARNESS_TASKS), task_manager=TaskManager(include_path=str(include), include_defaults=False),
                                   log_samples=True, bootstrap_iters=0, verbosity="ERROR")


@pytest.fixture(scope="module", params=["gpt2-bpe", "llama-gqa-trained-bpe"])
def exported(request, tmp_path_factory, task_dir):
    """(model, tokenizer, files, harness config dir, the harness `hf` model's output, the export)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from gptlab.hf.convert import export_hf

    if request.param == "gpt2-bpe":
        model, tok = random_model(GPT2_SHAPE, 0), BPETokenizer("gpt2")
    else:
        tok = trained_bpe()
        model = random_model(dict(LLAMA_SHAPE, vocab_size=tok.vocab_size), 1)
    d = tmp_path_factory.mktemp(request.param)
    export_hf(model, d / "hf", tok)
    files = {"hellaswag": task_dir / "eval" / "hellaswag_val.jsonl", "lambada": task_dir / "eval" / "lambada_test.jsonl",
             "choice": task_dir / "choice.jsonl"}
    include = harness_configs(d, files)
    hf = HFLM(pretrained=str(d / "hf"), batch_size=4, device="cpu", dtype="float32")
    return model, tok, files, include, run_harness(hf, include), d / "hf"


def test_native_scores_equal_the_harness_hf_model(exported):
    model, tok, files, _, harness, _ = exported
    for harness_task, ours in HARNESS_TASKS.items():
        task = load_task(str(files[ours]))
        scores = score_task(model, tok, task, batch_size=2)
        samples = sorted(harness["samples"][harness_task], key=lambda s: s["doc_id"])
        assert len(samples) == len(task.items) == len(scores)
        per_item = item_metrics(task, scores)
        for i, sample in enumerate(samples):
            theirs = [r[0] for r in sample["filtered_resps"]]
            mine = [s[0] for s in scores[i]]
            assert mine == pytest.approx(theirs, abs=1e-4), (harness_task, i)
            assert per_item["acc"][i] == sample["acc"], (harness_task, i)
            if "acc_norm" in sample:
                assert per_item["acc_norm"][i] == sample["acc_norm"], (harness_task, i)
        metrics = evaluate_task(model, tok, task)
        for name, value in harness["results"][harness_task].items():
            if name.split(",")[0] in ("acc", "acc_norm", "perplexity"):
                assert metrics[name.split(",")[0]]["value"] == pytest.approx(value, rel=1e-5), (harness_task, name)
    # the made-up items exercise what they should: a left-cut context and acc values that differ
    assert any(len(tok.encode(r["ctx_a"])) > model.config.block_size for r in HELLASWAG)
    assert 0 < harness["results"]["t_hellaswag"]["acc,none"] < 1 or harness["results"]["t_choice"]["acc,none"] not in (0, 1)


def test_adapter_equals_the_harness_hf_model(exported):
    from gptlab.eval.harness import lm_class

    model, tok, _, include, harness, _ = exported
    ours = run_harness(lm_class()(model, tok, batch_size=3), include)
    for task in HARNESS_TASKS:
        for sample, theirs in zip(sorted(ours["samples"][task], key=lambda s: s["doc_id"]),
                                  sorted(harness["samples"][task], key=lambda s: s["doc_id"])):
            assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(
                [r[0] for r in theirs["filtered_resps"]], abs=1e-4)
        for name, value in harness["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][name] == pytest.approx(value, rel=1e-5), (task, name)


# ----------------------------------------------------------------------------------------------
# python -m gptlab.eval: every tokenizer, the table and eval.json, bad input as one line


def char_checkpoint(path: Path) -> Path:
    from gptlab import checkpoint

    text = "".join(json.dumps(r) for r in HELLASWAG + LAMBADA + CHOICE)
    tok = CharTokenizer(text + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    cfg = dict(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)
    model = random_model(cfg, 2)
    return checkpoint.save(checkpoint.new_checkpoint(cfg, model.state_dict(), tok.state_dict()), path)


def eval_config(overrides: list[str]):
    from inprocess import compose_config

    return compose_config(overrides, config_name="eval")


def test_char_model_evaluates_through_the_command(tmp_path, task_dir, capsys):
    from gptlab.eval.cli import evaluate

    ckpt = char_checkpoint(tmp_path / "char.ckpt")
    out = tmp_path / "out"
    record = evaluate(eval_config([f"ckpt_path={ckpt}", f"tasks=[{task_dir / 'eval' / 'hellaswag_val.jsonl'},{task_dir / 'eval' / 'lambada_test.jsonl'},"
                                   f"{task_dir / 'choice.jsonl'}]", f"paths.data_dir={task_dir}", "download=false",
                                   "limit=2", "device=cpu"]), out)
    printed = capsys.readouterr().out
    written = json.loads((out / "eval.json").read_text())
    assert written["results"] == json.loads(json.dumps(record["results"]))
    assert set(written["results"]) == {"hellaswag_val", "lambada_test", "choice"}
    assert written["results"]["hellaswag_val"]["acc_norm"]["items"] == 2
    assert set(written["results"]["lambada_test"]) == {"acc", "perplexity"}
    ppl = written["results"]["lambada_test"]["perplexity"]["value"]
    assert 1 < ppl < float("inf")
    header = printed.splitlines()[0].split()
    assert header == ["task", "metric", "value", "stderr", "items"]
    assert any(line.split()[:2] == ["lambada_test", "perplexity"] and f"{ppl:.4f}" in line for line in printed.splitlines())


def test_nanogpt_style_scores_the_raw_context_per_token(task_dir):
    harness = load_task(str(task_dir / "eval" / "hellaswag_val.jsonl"))
    nano = load_task(str(task_dir / "eval" / "hellaswag_val.jsonl"), style="nanogpt")
    assert harness.items[1].context == "Baking cookies: How to bake cookies. Preheat the oven. Then mix the flour"
    assert harness.items[1].choices[:2] == ["and sugar in a bowl.", "with the eggs."]
    assert nano.items[1].context == "x" and nano.items[1].choices[0] == "and sugar [substeps] in a bowl."
    tok = BPETokenizer("gpt2")
    model = random_model(dict(GPT2_SHAPE, block_size=128), 3)
    scores = score_task(model, tok, nano)
    # build-nanogpt: context and " " + ending tokenized apart, acc_norm by the mean log-probability per token
    for item, item_scores in zip(nano.items, scores):
        ids = tok.encode(item.context)
        for choice, (ll, _, n) in zip(item.choices, item_scores):
            end = tok.encode(" " + choice)
            logp = torch.log_softmax(model(torch.tensor([ids + end]))[0, len(ids) - 1:-1], dim=-1)
            assert ll == pytest.approx(logp.gather(1, torch.tensor(end)[:, None]).sum().item(), abs=1e-4)
            assert n == len(end)
    per_item = item_metrics(nano, scores)
    expected = [float(max(range(len(s)), key=lambda i: s[i][0] / s[i][2]) == item.label)
                for item, s in zip(nano.items, scores)]
    assert per_item["acc_norm"] == expected


def bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_task_files_name_file_and_line(tmp_path, task_dir):
    with pytest.raises(ConfigError, match="unknown task 'nope'; known tasks: hellaswag, lambada"):
        load_task("nope")
    malformed = bad(tmp_path, "m.jsonl", json.dumps(CHOICE[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=f"{malformed}, line 2: not JSON"):
        load_task(str(malformed))
    wrong_keys = bad(tmp_path, "k.jsonl", json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match=f"{wrong_keys}, line 1: not a task item"):
        load_task(str(wrong_keys))
    out_of_range = bad(tmp_path, "r.jsonl", json.dumps(CHOICE[0]) + "\n" + json.dumps(dict(CHOICE[1], label=2)) + "\n")
    with pytest.raises(DataError, match=rf"{out_of_range}, line 2: label 2 is out of range for 2 choices \(0..1\)"):
        load_task(str(out_of_range))
    hs = bad(tmp_path, "h.jsonl", json.dumps(dict(HELLASWAG[0], label=4)) + "\n")
    with pytest.raises(DataError, match="line 1: label 4 is out of range for 4 choices"):
        load_task(str(hs))
    with pytest.raises(ConfigError, match="limit=0: must be a positive number"):
        load_task(str(task_dir / "choice.jsonl"), limit=0)
    empty = tmp_path / "data"
    with pytest.raises(DataError, match=r"the lambada task file is missing and download=false: download "
                                        r"https://openaipublic.*lambada_test.jsonl and put it at .*data/eval/lambada_test.jsonl"):
        load_task("lambada", data_dir=empty, fetch=False)
    for name in ("hellaswag", "lambada"):  # the made-up files fail the sha256
        with pytest.raises(DataError, match=f"is not the official {name} file"):
            load_task(name, data_dir=task_dir, fetch=False)


def test_command_errors_are_one_line(tmp_path, task_dir, capsys, monkeypatch):
    import sys

    from gptlab.eval.cli import evaluate
    from gptlab.run.job import run

    garbage = bad(tmp_path, "bad.ckpt", "not a checkpoint")
    out = tmp_path / "out"
    cases = [
        ([f"ckpt_path={garbage}", f"tasks=[{task_dir / 'choice.jsonl'}]"], "is not a PyTorch checkpoint file"),
        ([f"ckpt_path={garbage}", "tasks=[nope]"], "unknown task 'nope'; known tasks: hellaswag, lambada"),
        ([f"ckpt_path={garbage}", "limit=-1"], "limit=-1: must be a positive number"),
        ([f"ckpt_path={garbage}", "tasks=[]", "harness_tasks=[arc_easy]"], r'pip install -e "\.\[eval\]"'),
    ]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    for overrides, message in cases:
        cfg = eval_config(overrides)
        with pytest.raises(SystemExit) as exit_:
            run(lambda: evaluate(cfg, out), run_dir=None)
        assert exit_.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: "), err
        assert __import__("re").search(message, err[0]), err[0]
        assert not out.exists()


# ----------------------------------------------------------------------------------------------
# during training: callbacks=eval


@pytest.fixture(scope="module")
def train_tasks(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("train-tasks")
    return [write_jsonl(d / "lines.jsonl", TRAIN_CHOICE), write_jsonl(d / "words.jsonl", TRAIN_CLOZE)]


def eval_overrides(tasks: list[Path], *extra: str) -> list[str]:
    from conftest import SHAKESPEARE, TINY

    return [f"data.path={SHAKESPEARE}", *TINY, "callbacks=eval", f"callbacks.eval.tasks=[{tasks[0]},{tasks[1]}]",
            "callbacks.eval.limit=null", "callbacks.eval.every_n_validations=2", "callbacks.eval.batch_size=2",
            "trainer.val_check_interval=1", "logger=[tensorboard,csv]", "~callbacks.attention_maps",
            "~callbacks.text_sample", *extra]


def test_callback_logs_to_every_tracker_and_a_resume_keeps_its_points(tmp_path, data_dir, train_tasks, capsys):
    import pandas as pd

    from conftest import read_scalars
    from inprocess import run_train

    run = tmp_path / "run"
    value = run_train(eval_overrides(train_tasks, "trainer.max_steps=4", "optimized_metric=eval/lines/acc_norm"), run)
    assert value in (0.0, 1 / 3, 2 / 3, 1.0)
    run_train(eval_overrides(train_tasks, "trainer.max_steps=8", "resume=auto"), run)
    scalars = read_scalars(run / "tensorboard")
    # one line before the end-of-run block: the last evaluation
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[gptlab] eval at step 8: lines acc "))
    assert float(line.rsplit("perplexity ", 1)[1]) == pytest.approx(scalars["eval/words/perplexity"][-1][1], rel=1e-5)
    # every second validation (steps 2, 4, 6, 8; TensorBoard's axis counts from 0): none repeated, none lost
    for tag in ("eval/lines/acc", "eval/lines/acc_norm", "eval/words/acc", "eval/words/perplexity"):
        assert [s for s, _ in scalars[tag]] == [1, 3, 5, 7], tag
    # TensorBoard's HPARAMS tab has a column per task and metric
    from test_precision import hparams_plugin

    assert {"hp/eval/lines/acc_norm", "hp/eval/words/perplexity"} <= set(hparams_plugin(run / "tensorboard")["metrics"])
    assert scalars["hp/eval/lines/acc_norm"][-1] == scalars["eval/lines/acc_norm"][-1]
    rows = pd.read_csv(run / "csv" / "metrics.csv")
    logged = rows.dropna(subset=["eval/words/perplexity"])
    assert logged["step"].tolist() == [1, 3, 5, 7]
    assert logged["eval/words/perplexity"].tolist() == pytest.approx([v for _, v in scalars["eval/words/perplexity"]])
    # the last point is what the final weights score in one process
    final = native(run / "checkpoints" / "last.ckpt", train_tasks)
    assert scalars["eval/words/perplexity"][-1][1] == pytest.approx(final["words"]["perplexity"]["value"], rel=1e-5)
    assert scalars["eval/lines/acc_norm"][-1][1] == final["lines"]["acc_norm"]["value"]
    # the report shows the optimised eval metric as a column, read from the run's curves
    from gptlab.report import build_report
    from gptlab.run.naming import direction

    from omegaconf import OmegaConf

    from inprocess import compose_config

    # what Hydra writes at a run's start (the in-process runner does not)
    first = eval_overrides(train_tasks, "trainer.max_steps=4", "optimized_metric=eval/lines/acc_norm")
    (run / ".hydra").mkdir()
    OmegaConf.save(compose_config(first), run / ".hydra" / "config.yaml")
    report = build_report(run)
    assert report.jobs[0].metric == "eval/lines/acc_norm" and direction(report.jobs[0].metric) == "maximize"
    assert "eval/lines/acc_norm" in report.table.splitlines()[0]
    assert report.jobs[0].value == scalars["eval/lines/acc_norm"][-1][1]
    assert report.jobs[0].metric_curve == [(s + 1, v) for s, v in scalars["eval/lines/acc_norm"]]
    assert (run / "eval_lines_acc_norm.png") in report.files and (run / "eval_lines_acc_norm.png").stat().st_size > 0


def test_command_runs_harness_tasks_through_the_adapter(tmp_path, task_dir, capsys):
    """harness_tasks=[...] with a task config of one's own: the adapter's numbers are the native ones."""
    pytest.importorskip("lm_eval")
    from gptlab.eval.cli import evaluate

    ckpt = char_checkpoint(tmp_path / "char.ckpt")
    include = harness_configs(tmp_path, {"hellaswag": task_dir / "eval" / "hellaswag_val.jsonl",
                                         "lambada": task_dir / "eval" / "lambada_test.jsonl",
                                         "choice": task_dir / "choice.jsonl"})
    record = evaluate(eval_config([f"ckpt_path={ckpt}", f"tasks=[{task_dir / 'choice.jsonl'}]", "device=cpu",
                                   "harness_tasks=[t_choice,t_lambada]", f"harness_include=[{include}]"]), None)
    results = record["results"]
    assert results["t_choice"]["acc"]["value"] == results["choice"]["acc"]["value"]
    assert results["t_choice"]["acc_norm"]["value"] == results["choice"]["acc_norm"]["value"]
    assert results["t_choice"]["acc"]["items"] == 2
    native_lambada = evaluate_task(*__import__("gptlab.loading").loading.load_model(ckpt),
                                   load_task(str(task_dir / "eval" / "lambada_test.jsonl")))
    assert results["t_lambada"]["perplexity"]["value"] == pytest.approx(native_lambada["perplexity"]["value"], rel=1e-5)
    assert "t_lambada" in capsys.readouterr().out


def test_callback_stops_a_run_with_unscorable_items_before_it_trains(tmp_path, data_dir, train_tasks):
    from gptlab.errors import user_error
    from inprocess import run_train

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"context": "ROMEO:", "choices": ["caf\u00e9", "tea"], "label": 0}])
    run = tmp_path / "run"
    with pytest.raises(Exception) as failed:
        run_train(eval_overrides([odd, train_tasks[1]], "trainer.max_steps=2"), run)
    assert "outside this model's vocabulary" in str(user_error(failed.value))
    assert not (run / "checkpoints").exists()


def test_builtin_task_file_is_downloaded_once_and_checked(http_server, tmp_path, monkeypatch):
    from gptlab.eval.tasks import BUILTIN, Source
    from gptlab.files import sha256_file

    root, base = http_server
    served = write_jsonl(root / "lambada_test.jsonl", LAMBADA)
    official = Source(f"{base}/lambada_test.jsonl", "lambada_test.jsonl", "lambada", sha256_file(served))
    monkeypatch.setitem(BUILTIN, "lambada", official)
    data = tmp_path / "data"
    assert len(load_task("lambada", data_dir=data).items) == 3
    assert sha256_file(data / "eval" / "lambada_test.jsonl") == official.sha256
    served.unlink()  # the second use reads the local copy
    assert len(load_task("lambada", data_dir=data).items) == 3
    write_jsonl(served, LAMBADA[:2])  # a file that is not the pinned one
    monkeypatch.setitem(BUILTIN, "lambada", official)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_task("lambada", data_dir=tmp_path / "other")
    assert not (tmp_path / "other" / "eval" / "lambada_test.jsonl").exists()
    # unreachable: one line with the URL to fetch and where to put the file
    monkeypatch.setitem(BUILTIN, "lambada", Source("http://127.0.0.1:9/lambada_test.jsonl", official.file, "lambada",
                                                                 official.sha256))
    with pytest.raises(DataError, match=r"could not download http://127.0.0.1:9/lambada_test.jsonl .*offline, download "
                                        r"http://127.0.0.1:9/lambada_test.jsonl and put it at .*other/eval/lambada_test.jsonl"):
        load_task("lambada", data_dir=tmp_path / "other")


def test_adapter_rolling_and_generation_equal_the_harness_hf_model(exported):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gptlab.eval.harness import lm_class

    model, tok, _, _, _, hf_dir = exported
    ours = lm_class()(model, tok, batch_size=2)
    text = " ".join(r["text"] for r in LAMBADA)  # longer than block_size: several rolling windows
    assert len(tok.encode(text)) > model.config.block_size
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    prompts = [Instance("generate_until", {}, (r["text"], {"until": ["."], "max_gen_toks": 6}), i)
               for i, r in enumerate(LAMBADA[:2])]
    hf = HFLM(pretrained=str(hf_dir), batch_size=2, device="cpu", dtype="float32")
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-3)
    assert ours.generate_until(prompts) == hf.generate_until(prompts)


def test_word_model_scores_whole_words(task_dir):
    from gptlab.data.tokenizers import WordTokenizer
    from gptlab.eval.metrics import requests_for

    text = " ".join(json.dumps(r) for r in CHOICE + LAMBADA)
    tok = WordTokenizer(WordTokenizer.split(text))
    model = random_model(dict(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16), 4)
    task = load_task(str(task_dir / "choice.jsonl"))
    first = requests_for(task, tok)[0]
    assert first.context == tok.encode("The sky is") and first.continuations[0] == tok.encode("blue.")
    cloze = evaluate_task(model, tok, load_task(str(task_dir / "eval" / "lambada_test.jsonl")))
    assert cloze["acc"]["items"] == 3 and 1 < cloze["perplexity"]["value"] < float("inf")
    assert set(evaluate_task(model, tok, task)) == {"acc", "acc_norm"}
