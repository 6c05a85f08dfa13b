"""Sample text from a trained model: `python sample.py ckpt_path=<run>/checkpoints/last.ckpt [prompt=...]`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gptlab.config import validate_dataclass
from gptlab.errors import ConfigError
from gptlab.loading import DTYPES, Dtype, load_model, pick_device
from gptlab.run.job import run
from gptlab.sampling import MaxNewTokens, Temperature, TopK, TopP, generate, start_ids
from gptlab.schema import Positive

@dataclass
class SampleConfig:
    """conf/sample.yaml's keys and their types (checked before anything is loaded)."""

    ckpt_path: str | None = None
    tokenizer: str | None = None
    prompt: str | None = None
    num_samples: Positive = 3
    max_new_tokens: MaxNewTokens = 500
    temperature: Temperature = 0.8
    top_k: TopK = 200
    top_p: TopP = None
    greedy: bool = False
    seed: int = 1337
    device: str = "auto"
    dtype: Dtype = "float32"
    use_kv_cache: bool = True
    compile: bool | str = False


def read_prompt(prompt: str | None) -> str | None:
    if prompt is None or not prompt.startswith("FILE:"):
        return prompt
    file = Path(prompt[5:]).expanduser()
    if not file.is_file():
        raise ConfigError(f"prompt file not found: {file}")
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt file {file} is not UTF-8 text (byte offset {e.start}); convert it first") from None


def sample(cfg: DictConfig) -> list[str]:
    args = validate_dataclass(OmegaConf.to_container(cfg, resolve=True), SampleConfig)
    if args.ckpt_path is None:
        raise ConfigError("no checkpoint: pass ckpt_path=<run>/checkpoints/last.ckpt (or a Hugging Face model directory)")
    device = pick_device(args.device)
    model, tokenizer = load_model(args.ckpt_path, args.tokenizer)
    model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    if args.compile:  # true: the default backend (inductor); a string names another, e.g. aot_eager
        model.compile(**({"backend": args.compile} if isinstance(args.compile, str) else {}))
    ids = start_ids(tokenizer, read_prompt(args.prompt))
    block = model.config.block_size
    if len(ids) > block:
        print(f"[gptlab] the prompt has {len(ids)} tokens; using its last {block} (block_size)")
    idx = torch.tensor([ids[-block:]] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(
        model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        greedy=args.greedy, use_cache=args.use_kv_cache, generator=generator,
    )
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for text in texts:
        print(text)
        print("---------------")
    return texts


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(lambda: sample(cfg), run_dir=None)


if __name__ == "__main__":
    main()
