"""`python -m gptlab.eval ckpt_path=... tasks=[hellaswag,lambada]` (conf/eval.yaml; docs/evaluation.md)."""

import hydra
from omegaconf import DictConfig

from gptlab.eval.cli import main as evaluate


@hydra.main(version_base="1.3", config_path="../../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
