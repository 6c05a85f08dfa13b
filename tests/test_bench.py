"""Every benchmark in bench/ runs in its `--tiny` mode (seconds), so that none stops working unnoticed.

Each script is picked up by its file name and run in this process through its `main(argv)`; TINY
gives the arguments where `--tiny` alone is not what to run, CHECKS what its result must hold. The
figures of a tiny run mean nothing (the benchmarks themselves run on an idle machine: bench/README.md).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import warnings

import pytest
import torch

from conftest import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))
# the scripts whose tiny mode starts processes (memory: two ranks; bpb and quality run train.py in this process)
SLOW = {"memory"}
TINY = {"gpu": ["--tiny"] if torch.cuda.is_available() else ["--tiny", "--device", "cuda"]}


def check_generate(result, out):
    assert [r["new_tokens"] for r in result["results"]] == [8, 24]
    # both paths decode the same tokens while the sequence fits the block; past it the cache slides
    assert all(r["outputs_agree"] and r["cache_tokens_per_s"] > 0 for r in result["results"])


def check_train_throughput(result, out):
    r = result["result"]
    assert r["same_init"] and r["steps"] == 4
    assert r["max_abs_loss_diff_first_round"] < 1e-4  # the raw loop and Lightning train alike
    assert "Lightning overhead" in out


def check_quality(result, out):
    assert [a["option"] for a in result["ablation"]] == ["none (shakespeare_char_cpu_record)", "pos: rope -> learned"]
    assert result["ablation"][1]["params"] != result["ablation"][0]["params"]  # learned positions add a table
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] < 5 for r in result["runs"] + result["ablation"])


def check_bpb(result, out):
    (run,) = result["runs"]
    assert run["name"] == "char" and run["bytes_per_token"] == 1.0
    assert 0 < run["val_bpb"] < 8 and math.isclose(run["val_bpb"], run["val_loss"] / math.log(2), rel_tol=1e-3)


def check_prepare(result, out):
    (cell,) = result["results"]
    assert cell["workers"] == 2 and cell["tokens"] > 50_000 and cell["peak_rss_mb"] > 0


def check_loader(result, out):
    assert set(result["batch_s"]) == {"array", "mixture_2", "shards_3"} and result["step_s"] > 0
    assert set(result["memory_mb"]) == {1, 3} and "of a step" in out


def check_eval(result, out):
    # gptlab's packed scoring and the harness's hf model score the same continuations alike
    assert result["items"] == 8 and result["continuations"] == 32 and result["max_abs_ll_diff"] < 1e-4
    assert result["native"]["items_per_s"] > 0 and result["harness"]["items_per_s"] > 0


def check_health(result, out):
    wall, cpu = result["presets"]["tiny"]["wall"], result["presets"]["tiny"]["cpu"]
    for key in ("", "_mean"):
        assert set(wall["ms_per_step" + key]) == {"none", "default"} and set(wall["overhead_pct" + key]) == {"default"}
        assert all(v > 0 for v in wall["ms_per_step" + key].values())
    paired = wall["overhead_pct_paired"]["default"]  # one round: its overhead, no interval
    assert len(wall["round_median_ms"]) == 1 and paired["low"] is None
    assert paired["mean"] == pytest.approx(wall["round_median_ms"][0]["default"] / wall["round_median_ms"][0]["none"] * 100 - 100)
    # the CPU-time accounting saw the statistics' hooks (default only) and clipping (both runs)
    assert "TrainingHealth.on_before_optimizer_step" in cpu["default"]["timed_ms_per_step"]
    assert "SpikeGuard.on_before_optimizer_step" not in cpu["none"]["timed_ms_per_step"]
    assert "health.max_attention_logit" in cpu["default"]["timed_ms_per_step"]
    assert all(cpu[v]["timed_ms_per_step"]["LanguageModel.configure_gradient_clipping"] > 0 for v in ("none", "default"))
    assert "overhead (mean)" in out and "CPU time" in out


def check_report(result, out):
    # 2 budgets x 3 depths x 2 seeds: 6 groups of 2 seeds, and a scaling fit over the 2 budgets
    assert result["jobs"] == 12 and result["groups"] == 6 and result["exponent_a"] is not None
    assert {"isoflop.png", "frontier.png", "groups.csv", "scaling.csv", "report.md"} <= set(result["written"])


def check_gpu(result, out):
    if torch.cuda.is_available():
        assert result["baby"]["sides"]["raw"]["ms_per_step"] > 0 and result["sample"]["speedup"] > 0
    else:
        assert result == {} and "gpu --tiny: skipped, no CUDA device here" in out


def check_memory(result, out):
    ddp, fsdp2 = (result["state"]["ranks"][0][k] for k in ("ddp", "fsdp2"))
    for part in ("params", "grads", "optimizer"):  # about half on 2 ranks (shards may be padded)
        assert 0.45 < fsdp2[part] / ddp[part] < 0.55
    assert result["fsdp2_over_ddp"] <= 0.6 and result["activations"]["cut"] >= 2


CHECKS = {name[len("check_"):]: f for name, f in globals().items() if name.startswith("check_")}


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their helpers as siblings
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SCRIPTS])
def test_tiny_mode(name, tmp_path, monkeypatch, capsys, data_dir):
    module = load(name)
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path)  # results of a tiny run stay out of bench/
    # a script quiets Lightning's loggers and warnings for its own output: the tests after it must not inherit that
    levels = {n: logging.getLogger(n).level for n in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")}
    try:
        with warnings.catch_warnings():
            result = module.main(TINY.get(name, ["--tiny"]))
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
    out = capsys.readouterr().out
    if name in CHECKS:
        CHECKS[name](result, out)
    if result:  # a run that did not skip writes its JSON
        assert list(tmp_path.glob("*.json")), out[-2000:]


def test_train_throughput_hands_the_health_overhead_to_bench_health():
    tt = load("train_throughput")
    args = tt.parse_args(["--health-overhead", "--preset", "baby", "--rounds", "6"])
    assert tt.health_argv(args) == ["--preset=baby", "--rounds=6"]
    assert tt.health_argv(tt.parse_args(["--health-overhead", "--tiny"])) == ["--tiny"]
    assert load("health").PRESETS["baby"][0][1] == "model=baby_shakespeare"


def test_every_check_names_a_script():
    assert set(CHECKS) <= set(SCRIPTS)
