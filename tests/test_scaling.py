"""Scaling laws: the approach-2 fit recovers the exponents of a known law from synthetic results; a tiny
real isoFLOP sweep (hparams_search=isoflop) runs end to end, each job on its budget, and its report draws
the isoFLOP and frontier plots; the sweep's bad settings (bench/report.py --tiny: tests/test_bench.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import SHAKESPEARE, TINY, read_scalars
from inprocess import run_main_captured
from gptlab.errors import ConfigError
from gptlab.report.scaling import Point, fit
from gptlab.run.grids import isoflop_jobs

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3): with D = C / 6N the loss-optimal
# N_opt grows as C^(beta / (alpha + beta)) and D_opt as C^(alpha / (alpha + beta))
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TRUE_A, TRUE_B = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)


def synthetic(noise: float, sizes: int = 7) -> list[Point]:
    rng = np.random.default_rng(1)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    points = []
    for c in (1e17, 1e18, 1e19, 1e20, 1e21):
        n_opt = g * (c / 6) ** TRUE_A
        for x in np.linspace(-0.6, 0.6, sizes):  # a decade and more around the optimum
            n = n_opt * 10**x
            d = c / (6 * n)
            points.append(Point(c, n, d, (E + A / n**ALPHA + B / d**BETA) * (1 + rng.normal(0, noise))))
    return points


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_the_fit_recovers_known_exponents(noise):
    result = fit(synthetic(noise))
    assert abs(result.n_law.exponent - TRUE_A) < 0.02 and abs(result.d_law.exponent - TRUE_B) < 0.02
    assert result.resamples == 1000 and not result.notes
    if noise:
        assert result.n_law.low < TRUE_A < result.n_law.high and result.d_law.low < TRUE_B < result.d_law.high
        assert result.n_law.high - result.n_law.low < 0.1
        assert fit(synthetic(noise)).n_law.low == result.n_law.low  # a seeded bootstrap
    for f in result.budgets:  # D_opt C = 6 N_opt D_opt: the two minima agree
        assert f.d_opt == pytest.approx(f.flops / (6 * f.n_opt), rel=0.02) and not f.extrapolated


def test_what_cannot_be_fitted_is_said():
    points = [p for p in synthetic(0.0) if p.flops == 1e17]
    one = fit(points)
    assert one.n_law is None and "power laws need minima at 2 or more budgets" in one.notes
    assert one.budgets[0].n_opt is not None
    concave = [Point(c, n, c / n, -abs(math.log10(n) - 5)) for c in (1e12, 1e13) for n in (1e4, 1e5, 1e6)]
    result = fit(concave)
    assert result.n_law is None and all(f.n_opt is None for f in result.budgets)
    assert any("no minimum" in n for n in result.notes)


def test_isoflop_jobs_follow_the_depth_rule():
    jobs = isoflop_jobs([["data.batch_size=8", "model.n_layer=2"]], [1e13, 3e13], [2, 4])
    assert jobs[0] == ["data.batch_size=8", "budget.flops=1e+13", "model.n_layer=2", "model.n_embd=64", "model.n_head=2"]
    assert [j[1:] for j in jobs][-1] == ["budget.flops=3e+13", "model.n_layer=4", "model.n_embd=128", "model.n_head=4"]
    assert len(jobs) == 4
    with pytest.raises(ConfigError, match="not a multiple of hydra.sweeper.head_dim=64"):
        isoflop_jobs([[]], [1e13], [3], aspect=32, head_dim=64)
    with pytest.raises(ConfigError, match="needs hydra.sweeper.budgets"):
        isoflop_jobs([[]], [], [2])


@pytest.mark.slow
def test_a_tiny_isoflop_sweep_end_to_end(tmp_path, data_dir):
    """2 budgets x 3 depths of a tiny char model: each job trains the steps its budget buys (its
    FLOPs spent within one step of the budget), and the report fits and draws what it can."""
    sweep = tmp_path / "isoflop"
    code, _, err = run_main_captured([
        f"data.path={SHAKESPEARE}", *TINY, "~callbacks.attention_maps", "callbacks.text_sample.max_new_tokens=4",
        "hparams_search=isoflop", "hydra.sweeper.budgets=[1e9,2e9]", "hydra.sweeper.depths=[1,2,3]",
        "trainer.val_check_interval=1000", "optim=adamw", "optim.warmup_steps=0", f"hydra.sweep.dir={sweep}"])
    assert code == 0, err[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 6
    for job in jobs:
        budget = json.loads((job / "DONE").read_text())["budget"]
        per_step = budget["flops_per_token"] * budget["tokens_per_step"]
        assert budget["flops"] - per_step < budget["flops_spent"] <= budget["flops"]
        assert read_scalars(job / "tensorboard")["train/tokens"][-1][1] == budget["tokens_spent"]
    for name in ("isoflop.png", "frontier.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (sweep / "report.md").read_text()
    assert "## Scaling laws: isoFLOP profiles (Chinchilla approach 2)" in md and "![isoflop](isoflop.png)" in md
    rows = list(csv.DictReader((sweep / "scaling.csv").open()))
    assert {float(r["budget_flops"]) for r in rows if r["quantity"] == "N_opt"} == {1e9, 2e9}


def test_the_isoflop_sweeper_sets_the_budget_itself():
    from omegaconf import OmegaConf

    from hydra_plugins.gptlab_sweeper.grid_sweepers import IsoFLOPSweeper

    sweeper = IsoFLOPSweeper(budgets=[1e13], depths=[2])
    assert "give no budget.flops/tokens" in sweeper.check(OmegaConf.create({"budget": {"tokens": 1e6}}))
    assert sweeper.check(OmegaConf.create({"budget": {"flops": None, "tokens": None}})) is None
