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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval-tasks")
    (d / "eval").mkdir()
    write_jsonl(d / "eval" / "hellaswag_val.jsonl", HELLASWAG)
    write_jsonl(d / "eval" / "lambada_test.jsonl", LAMBADA)  # not lambada's official sha256: a made-up file
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
    """(model, tokenizer, files, harness config dir, the harness `hf` model's output on the export)."""
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
    return model, tok, files, include, run_harness(hf, include)


def test_native_scores_equal_the_harness_hf_model(exported):
    model, tok, files, _, harness = exported
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

    model, tok, _, include, harness = exported
    ours = run_harness(lm_class()(model, tok, batch_size=3), include)
    for task in HARNESS_TASKS:
        for sample, theirs in zip(sorted(ours["samples"][task], key=lambda s: s["doc_id"]),
                                  sorted(harness["samples"][task], key=lambda s: s["doc_id"])):
            assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(
                [r[0] for r in theirs["filtered_resps"]], abs=1e-4)
        for name, value in harness["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][name] == pytest.approx(value, rel=1e-5), (task, name)
