"""An Optuna sweep's study, for Optuna's own plots (optimisation history, parameter importances).

The study is read from the sweeper's RDB storage (`hydra.sweeper.storage`, or an `*.db` file in the
sweep directory). Where there is none (the default `storage: null` keeps it in memory, gone with the
sweep) or it cannot be read, it is rebuilt from the job directories: the search space is parsed from
the sweeper's `params` and the sweep's command line by the sweeper's own parser
(gptlab.run.optuna_space), each job's values come from its overrides, its result from its DONE /
PRUNED / FAILED marker.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from gptlab.compat import distribution_holds
from gptlab.files import atomic_write
from gptlab.report.collect import Job, natural
from gptlab.run.job import read_yaml
from gptlab.run.naming import direction

_INTERPOLATION = re.compile(r"\$\{[^}]*\}")


def sweep_settings(group: Path, runs: list[Path]) -> tuple[dict[str, Any], list[str], str | None]:
    """The group's `hydra.sweeper` node, the sweep's command-line overrides and the launch directory:
    from the sweep's multirun.yaml, else from its first job's .hydra/hydra.yaml."""
    sources = [group / "multirun.yaml"] + [r / ".hydra" / "hydra.yaml" for r in runs[:1]]
    for source in sources:
        hydra = (read_yaml(source) or {}).get("hydra")
        if hydra:
            launch = (hydra.get("overrides") or {}).get("task") or [] if source.name == "multirun.yaml" else []
            return hydra.get("sweeper") or {}, [str(o) for o in launch], (hydra.get("runtime") or {}).get("cwd")
    return {}, [], None


def is_optuna(sweeper: dict[str, Any]) -> bool:
    target = str(sweeper.get("_target_", ""))
    return "optuna" in target.lower() or target.endswith(".StudySweeper")  # gptlab's, or Hydra's former one


def _storage_url(sweeper: dict[str, Any], group: Path, cwd: str | None) -> str | None:
    url = sweeper.get("storage")
    if isinstance(url, str) and url:
        url = url.replace("${hydra.sweep.dir}", str(group)).replace("${hydra:sweep.dir}", str(group))
        if url.startswith("sqlite:///") and not _INTERPOLATION.search(url):
            path = Path(url[len("sqlite:///"):])
            path = path if path.is_absolute() else Path(cwd or ".") / path
            if path.is_file():
                return f"sqlite:///{path}"
        elif not url.startswith("sqlite:") and not _INTERPOLATION.search(url):
            return url  # a database server
    files = sorted(group.glob("*.db"))
    return f"sqlite:///{files[0].resolve()}" if files else None


def _load(url: str, name: str | None):
    import optuna

    names = [s.study_name for s in optuna.get_all_study_summaries(storage=url)]
    if name not in names:
        if len(names) != 1:
            raise ValueError(f"study {name!r} not in it (studies: {names})")
        name = names[0]
    return optuna.load_study(study_name=name, storage=url)


def _space(sweeper: dict[str, Any], launch: list[str], jobs: list[Job], values: list[dict[str, Any]]) -> dict:
    """The dimensions the jobs varied, as the sweeper parsed them; one whose jobs' values it does not
    hold (another sweep of the study searched it otherwise) or that the config does not list becomes a
    categorical one of the values the jobs took."""
    from optuna.distributions import CategoricalDistribution

    from gptlab.errors import ConfigError
    from gptlab.run.optuna_space import search_space

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        space, _ = search_space(params + launch)  # the command line's replace the config's
    except ConfigError:  # not a space Optuna can express: the jobs' values, below, still are
        space = {}
    varied = {k for v in values for k in v if len({repr(w.get(k)) for w in values}) > 1}
    for key in set(space) - varied:
        del space[key]  # one value in every job (fixed on the command line): nothing to rank
    for key in varied:
        seen = [v[key] for v in values if key in v]
        dist = space.get(key)
        if dist is None or not all(distribution_holds(dist, x) for x in seen):
            space[key] = CategoricalDistribution(sorted(set(seen), key=repr))
    return space


def _rebuild(sweeper: dict[str, Any], launch: list[str], jobs: list[Job]):
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    jobs = [j for j in sorted(jobs, key=lambda j: natural(j.path.name)) if j.status != "running"]
    values = [{o.get_key_element(): o.value() for o in parser.parse_overrides(j.overrides)} for j in jobs]
    space = _space(sweeper, launch, jobs, values)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        way = sweeper.get("direction") or direction(jobs[0].metric if jobs else None)
        study = optuna.create_study(direction=str(way), study_name=sweeper.get("study_name"))
    finally:
        optuna.logging.set_verbosity(verbosity)
    states = {"finished": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
    for job, job_values in zip(jobs, values):
        params = {k: v for k, v in job_values.items() if k in space}
        state = states.get(job.status, optuna.trial.TrialState.FAIL) if job.value is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: space[k] for k in params},
            value=job.value if state == optuna.trial.TrialState.COMPLETE else None, state=state,
            intermediate_values={job.steps or 0: job.value} if state == optuna.trial.TrialState.PRUNED else None))
    return study


def load_study(group: Path, jobs: list[Job]) -> tuple[Any, list[str]]:
    """(the study or None, notes for the report)."""
    runs = [j.path for j in jobs]
    sweeper, launch, cwd = sweep_settings(group, runs)
    if not is_optuna(sweeper):
        return None, []
    if isinstance(sweeper.get("direction"), (list, tuple)):
        return None, ["a multi-objective Optuna study: no Optuna plots"]
    notes: list[str] = []
    url = _storage_url(sweeper, group, cwd)
    if url:
        try:
            return _load(url, sweeper.get("study_name")), [f"Optuna study read from {url}"]
        except Exception as e:  # any storage fault: the job directories hold the same trials
            notes.append(f"cannot read the Optuna storage {url} ({type(e).__name__}: {e}); "
                         f"rebuilt the study from the job directories")
    else:
        notes.append("Optuna study rebuilt from the job directories (no storage file found)")
    with warnings.catch_warnings():
        return _rebuild(sweeper, launch, jobs), notes


def plot_study(study: Any, group: Path) -> tuple[list[Path], list[str]]:
    """Optuna's optimisation-history plot and the parameter importances, as PNGs in `group`."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    written, notes = [], []
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = [("optuna_history.png", lambda: ovm.plot_optimization_history(study).figure)]
    if len(complete) >= 2 and any(t.distributions for t in complete):
        plots.append(("optuna_importance.png", lambda: ovm.plot_param_importances(study).figure))
    else:
        notes.append("parameter importances need 2 or more finished trials with parameters")
    for filename, plot in plots:
        # rc_context: Optuna's plots switch matplotlib to its ggplot style for the whole process
        with warnings.catch_warnings(), plt.rc_context():
            # optuna.visualization.matplotlib is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                figure = plot()
            except (ValueError, RuntimeError) as e:  # e.g. importances of parameters that never varied
                notes.append(f"{filename}: {e}")
                continue
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            with atomic_write(group / filename, "wb") as f:
                figure.savefig(f, format="png", dpi=90)
            plt.close(figure)
        written.append(group / filename)
    return written, notes
