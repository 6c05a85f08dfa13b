"""Seeds and groups: a real ablation sweep (hparams_search=ablation, equal token budget) of a base and
one change x 3 seeds, plus a change whose jobs fail; the report's means, intervals and Welch p-values
recomputed with scipy from the runs' own event files; failed jobs left out and listed; one-seed groups;
the bad inputs of `python -m gptlab.report`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from conftest import SHAKESPEARE, TINY, read_scalars
from inprocess import run_main_captured
from gptlab.errors import ConfigError
from gptlab.report import build_report, mark_failed
from gptlab.report.__main__ import main as cli
from gptlab.report.groups import holm
from gptlab.run.grids import ablation_jobs

pytestmark = pytest.mark.slow
ROPE = "model.pos=rope"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir) -> Path:
    """9 jobs: seeds 1-3 of the base, of model.pos=rope and of model.n_head=5 (fails: 32 channels)."""
    sweep_dir = tmp_path_factory.mktemp("ablation") / "sweep"
    code, _, err = run_main_captured([
        f"data.path={SHAKESPEARE}", *TINY, "~callbacks.attention_maps", "callbacks.text_sample.max_new_tokens=4",
        "hparams_search=ablation", "budget.tokens=2048", "trainer.val_check_interval=4", "optim=adamw",
        "optim.warmup_steps=0", f'hydra.sweeper.changes=["{ROPE}","model.n_head=5"]', "hydra.sweeper.seeds=3",
        f"hydra.sweep.dir={sweep_dir}"])
    assert code == 1, err[-3000:]  # the sweep tally: 3 jobs failed
    assert "[gptlab] 9 jobs: 6 finished, 3 failed" in err and "Traceback" not in err
    return sweep_dir


def job_values(sweep: Path) -> dict[tuple[str, ...], list[tuple[float, float]]]:
    """(final, best) val/loss of each finished job, read from its own event file, by its overrides but seed."""
    out: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        if not (job / "DONE").exists():
            continue
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        key = tuple(o for o in overrides if o in (ROPE, "model.n_head=5"))
        losses = [v for _, v in read_scalars(job / "tensorboard")["val/loss"]]
        out.setdefault(key, []).append((losses[-1], min(losses)))
    return out


def test_the_ablation_runs_each_change_with_each_seed_at_equal_budget(sweep):
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    overrides = [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) for j in jobs]
    assert [o[-2:] for o in overrides[:3]] == [["optim.warmup_steps=0", "seed=1"], [ROPE, "seed=1"],
                                                ["model.n_head=5", "seed=1"]]
    assert [o[-1] for o in overrides] == [f"seed={s}" for s in (1, 2, 3) for _ in range(3)]
    assert all("model.n_head=2" not in o for o in overrides[2::3])  # the change replaced the base's value
    budgets = [json.loads((j / "DONE").read_text())["budget"] for j in jobs if (j / "DONE").exists()]
    assert len(budgets) == 6 and all(b["steps"] == 8 and b["tokens_spent"] == 2048 for b in budgets)
    assert all((j / "FAILED").read_text().startswith("model.n_embd=32 is not divisible") for j in jobs[2::3])
    assert (sweep / "report.md").is_file() and (sweep / "groups.csv").is_file()  # the SweepReport callback


def test_statistics_match_scipy_on_the_logged_values(sweep):
    values = job_values(sweep)
    base, rope = np.array(values[()]), np.array(values[(ROPE,)])
    assert base.shape == rope.shape == (3, 2)
    rep = build_report(sweep).seeds
    assert [g.name for g in rep.groups] == ["model.n_head=2", "model.n_head=2,model.pos=rope", "model.n_head=5"]
    assert rep.baseline is rep.groups[0]
    rows = {(r["group"], r["statistic"]): r for r in csv.DictReader((sweep / "groups.csv").open())}
    for i, column in enumerate(("final val/loss", "best val/loss")):
        for name, x in (("model.n_head=2", base[:, i]), ("model.n_head=2,model.pos=rope", rope[:, i])):
            row = rows[(name, column)]
            low, high = stats.t.interval(0.95, 2, loc=x.mean(), scale=stats.sem(x))
            assert int(row["n"]) == 3
            assert float(row["mean"]) == pytest.approx(x.mean(), rel=1e-9)
            assert float(row["std"]) == pytest.approx(x.std(ddof=1), rel=1e-9)
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-9)
        welch = stats.ttest_ind(rope[:, i], base[:, i], equal_var=False)
        row = rows[("model.n_head=2,model.pos=rope", column)]
        assert float(row["diff"]) == pytest.approx(rope[:, i].mean() - base[:, i].mean(), rel=1e-9)
        ci = welch.confidence_interval(0.95)
        assert (float(row["diff_low"]), float(row["diff_high"])) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert float(row["p"]) == pytest.approx(welch.pvalue, rel=1e-9)
        # one comparison with a p-value (the failed group has none): Holm leaves it as it is
        assert float(row["p_holm"]) == pytest.approx(welch.pvalue, rel=1e-9)
        assert rows[("model.n_head=5", column)]["n"] == "0"
    jobs = {r["job"]: r for r in csv.DictReader((sweep / "report.csv").open())}
    assert jobs["1"]["group"] == "model.n_head=2,model.pos=rope" and jobs["2"]["group"] == "model.n_head=5"
    md = (sweep / "report.md").read_text()
    assert f"{welch.pvalue:.3g}" in md and "## Groups: jobs that differ only by seed" in md
    for job in ("2", "5", "8"):  # the failed jobs: left out and listed
        assert f"- job {job} (model.n_head=5,seed=" in md
    assert "![groups_val_loss](groups_val_loss.png)" in md and (sweep / "groups_final_val_loss.png").is_file()


def test_one_seed_groups_baseline_and_metric(sweep, tmp_path, capsys):
    copy = Path(shutil.copytree(sweep, tmp_path / "sweep"))
    for job in ("4", "7"):  # the rope group keeps seed 1 only
        mark_failed(copy / job, "killed")
    rep = build_report(copy, metrics=["train/loss"], baseline=ROPE).seeds
    rope = next(g for g in rep.groups if g.name.endswith(ROPE))
    assert rep.baseline is rope and rep.primary == "final train/loss"
    assert rope.stats["final val/loss"].n == 1 and rope.stats["final val/loss"].low is None
    md = (copy / "report.md").read_text()
    assert "n=1: no interval" in md and "needs n >= 2 on both sides" in md
    assert "### final train/loss" in md and (copy / "groups_final_train_loss.png").is_file()
    assert "- job 4 (model.n_head=2,model.pos=rope,seed=2): failed: killed" in md

    before = (copy / "report.md").read_text()
    for args, message in (
        (["--baseline", "model.pos=alibi"], "Error: --baseline 'model.pos=alibi' matches no group; the groups are: "
                                            "model.n_head=2; model.n_head=2,model.pos=rope; model.n_head=5"),
        (["--baseline", "data.batch_size=8"], "Error: --baseline 'data.batch_size=8' matches 3 groups"),
        (["--metric", "val/acc"], "Error: unknown metric 'val/acc': the finished jobs logged "),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli([str(copy), *args])
        assert exit_.value.code == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    assert (copy / "report.md").read_text() == before  # nothing written
    with pytest.raises(ConfigError, match="matches no group"):
        build_report(copy, baseline="seed=1")


def test_holm():
    # p-values 0.01, 0.04, 0.03 of 3 tests: 3 x 0.01, then max(0.03, 2 x 0.03), then max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None, 0.9]) == pytest.approx([1.0, None, 1.0])


def test_ablation_jobs():
    jobs = ablation_jobs([["experiment=x", "model.pos=rope"]], ["model.pos=learned", ["optim=adamw", "optim.lr=1e-3"]], 2)
    assert jobs == [["experiment=x", "model.pos=rope", "seed=1"], ["experiment=x", "model.pos=learned", "seed=1"],
                    ["experiment=x", "model.pos=rope", "optim=adamw", "optim.lr=1e-3", "seed=1"],
                    ["experiment=x", "model.pos=rope", "seed=2"], ["experiment=x", "model.pos=learned", "seed=2"],
                    ["experiment=x", "model.pos=rope", "optim=adamw", "optim.lr=1e-3", "seed=2"]]
    with pytest.raises(ConfigError, match="is not an override"):
        ablation_jobs([[]], ["model.pos"], 1)


def test_the_ablation_sweeper_wants_a_budget():
    from omegaconf import OmegaConf

    from hydra_plugins.gptlab_sweeper.grid_sweepers import AblationSweeper

    sweeper = AblationSweeper(changes=[ROPE], seeds=2)
    assert "give budget.flops=<FLOPs> or budget.tokens=<tokens>" in sweeper.check(OmegaConf.create({"budget": {}}))
    assert sweeper.check(OmegaConf.create({"budget": {"flops": 1e12}})) is None
