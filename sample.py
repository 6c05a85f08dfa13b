"""Sample text from a trained model: `python sample.py ckpt_path=<run>/checkpoints/last.ckpt [prompt=...]`."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gptlab import checkpoint
from gptlab.config import validate_dataclass
from gptlab.data.tokenizers import tokenizer_from_state
from gptlab.errors import CheckpointError, ConfigError
from gptlab.run.job import run
from gptlab.sampling import MaxNewTokens, Temperature, TopK, TopP, generate, start_ids
from gptlab.schema import Positive

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = {name: getattr(torch, name) for name in typing.get_args(Dtype)}


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"device={name}: this machine has {have}; use device=cpu or device=auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name}: MPS is not available here; use device=cpu or device=auto")
    return device


def load_model(path: str | Path, tokenizer: str | None = None):
    """(model, tokenizer) from a gptlab checkpoint file or a Hugging Face model directory
    (`tokenizer`: the directory's tokenizer when it names none, see gptlab/hf/tokenizer.py)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        from gptlab.hf import load_hf_model

        return load_hf_model(path, tokenizer)
    ckpt = checkpoint.load(path)
    model, hparams = checkpoint.model_from_checkpoint(ckpt, path)
    if not hparams.get("tokenizer"):
        raise CheckpointError(f"{path} carries no tokenizer state; it cannot be sampled from text")
    return model, tokenizer_from_state(hparams["tokenizer"])


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
