"""A run's plumbing, around the model and data: one job's life under Hydra (`job`), the training job
itself (`fit`), resume (`resume`), the experiment trackers (`trackers`), the console (`console`),
Hydra's callbacks (`hydra_callbacks`), DDP inside a multirun (`multirun_ddp`) and the Optuna sweeper
(`optuna_sweeper`, its search space `optuna_space` and its jobs' side `pruning`)."""
