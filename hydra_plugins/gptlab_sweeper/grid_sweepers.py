"""`hydra.sweeper._target_` of conf/hydra/sweeper/{ablation,isoflop}.yaml: Hydra's basic sweeper over the
job lists of gptlab.run.grids (Hydra instantiates sweepers only from the hydra_plugins namespace)."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class _GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None, **grid: Any) -> None:
        super().__init__(max_batch_size, params)
        self.grid = grid

    def jobs(self, bases: list[list[str]]) -> list[list[str]]:
        raise NotImplementedError

    def check(self, config: Any) -> str | None:
        """What is wrong with the sweep's config, or None."""
        return None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from gptlab.run.hydra_callbacks import fail

        problem = self.check(config)
        if problem:
            fail(problem)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def split_arguments(self, overrides: list[Any], max_batch_size: int | None) -> list[list[list[str]]]:
        """The command line's jobs (a product, as the basic sweeper makes it), each expanded by `jobs`."""
        from gptlab.errors import ConfigError
        from gptlab.run.hydra_callbacks import fail

        bases = BasicSweeper.split_arguments(overrides, None)[0]
        try:
            jobs = self.jobs(bases)
        except ConfigError as e:
            fail(str(e))
        return [list(c) for c in BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size)]


class AblationSweeper(_GridSweeper):
    """The base, then each change alone, for each seed (hydra.sweeper.changes, hydra.sweeper.seeds)."""

    def check(self, config: Any) -> str | None:
        budget = config.get("budget") or {}
        if budget.get("flops") is None and budget.get("tokens") is None:
            return ("hparams_search=ablation compares at equal compute: give budget.flops=<FLOPs> or "
                    "budget.tokens=<tokens>")
        return None

    def jobs(self, bases: list[list[str]]) -> list[list[str]]:
        from gptlab.run.grids import ablation_jobs

        return ablation_jobs(bases, list(self.grid.get("changes") or []), self.grid.get("seeds"))


class IsoFLOPSweeper(_GridSweeper):
    """Each FLOP budget times each model depth (hydra.sweeper.budgets, depths, aspect, head_dim, seeds)."""

    def check(self, config: Any) -> str | None:
        budget = config.get("budget") or {}
        if budget.get("flops") is not None or budget.get("tokens") is not None:
            return "hparams_search=isoflop sets budget.flops from hydra.sweeper.budgets: give no budget.flops/tokens"
        return None

    def jobs(self, bases: list[list[str]]) -> list[list[str]]:
        from gptlab.run.grids import isoflop_jobs

        g = self.grid
        return isoflop_jobs(bases, list(g.get("budgets") or []), list(g.get("depths") or []), int(g.get("aspect", 32)),
                            int(g.get("head_dim", 32)), g.get("seeds"))
