"""Train a language model: `python train.py [experiment=...] [group=option] [key=value ...]`.

Hydra composes conf/train.yaml; gptlab.run.fit does the work. Returns the final validation loss (the
value named by `optimized_metric`) so that sweepers (basic, Optuna) can optimise it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.run.console import quiet_lightning
from gptlab.run.fit import fit, report, train  # noqa: F401  (train: what tests and sweepers call in-process)
from gptlab.run.job import run
from gptlab.run.multirun_ddp import distributed_job, install_multirun_ddp_fix


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    install_multirun_ddp_fix(Path(__file__).resolve())
    quiet_lightning()  # before any Trainer or callback is made
    with distributed_job():
        return run(lambda: report(fit(cfg)), run_dir=cfg.paths.output_dir)


if __name__ == "__main__":
    main()
