"""Sample text from a trained model: `python sample.py ckpt_path=<run>/checkpoints/last.ckpt [prompt=...]`."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptlab import checkpoint
from gptlab.checkpoint import model_from_checkpoint
from gptlab.cli import pick_device, user_errors
from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import CheckpointError, ConfigError
from gptlab.sampling import check_sampling_args, generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, tokenizer: str | None = None):
    """(model, tokenizer) from a gptlab checkpoint file or a Hugging Face GPT-2 directory
    (`tokenizer`: the directory's tokenizer when it names none, see gptlab/hf/tokenizer.py)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        from gptlab.hf import load_hf_model

        return load_hf_model(path, tokenizer)
    ckpt = checkpoint.load(path)
    model, hparams = model_from_checkpoint(ckpt, path)
    if not hparams.get("tokenizer"):
        raise CheckpointError(f"{path} carries no tokenizer state; it cannot be sampled from text")
    return model, tokenizer_from_state(hparams["tokenizer"])


def read_prompt(prompt: str) -> str:
    if prompt.startswith("FILE:"):
        file = Path(prompt[5:]).expanduser()
        if not file.is_file():
            raise ConfigError(f"prompt file not found: {file}")
        return file.read_text(encoding="utf-8")
    return prompt


def sample(cfg: DictConfig) -> list[str]:
    check_sampling_args(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        raise ConfigError(f"num_samples={cfg.num_samples!r}: must be a positive integer")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: choose one of {sorted(DTYPES)}")
    device = pick_device(cfg.device)
    model, tokenizer = load_model(cfg.ckpt_path, cfg.get("tokenizer"))
    model.to(device=device, dtype=DTYPES[cfg.dtype]).eval()
    if cfg.compile:  # true: the default backend (inductor); a string names another, e.g. aot_eager
        model.compile(**({"backend": cfg.compile} if isinstance(cfg.compile, str) else {}))
    ids = tokenizer.encode(read_prompt(str(cfg.prompt)))
    if not ids:
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    block = model.config.block_size
    if len(ids) > block:
        print(f"[gptlab] the prompt has {len(ids)} tokens; using its last {block} (block_size)")
    idx = torch.tensor([ids[-block:]] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(
        model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        greedy=cfg.greedy, use_cache=cfg.use_kv_cache, generator=generator,
    )
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for text in texts:
        print(text)
        print("---------------")
    return texts


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
