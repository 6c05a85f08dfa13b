"""`python -m gptlab.hf export|import`: convert between gptlab checkpoints and Hugging Face GPT-2 / Llama."""

from __future__ import annotations

import argparse
import os
import sys

from gptlab.errors import GptlabError
from gptlab.hf.convert import export_checkpoint, import_checkpoint


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptlab.hf", description="Convert between gptlab checkpoints and Hugging Face GPT-2 / Llama."
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="gptlab .ckpt -> Hugging Face directory (Llama for model.pos=rope, else GPT-2)")
    e.add_argument("ckpt", help="a gptlab checkpoint, e.g. outputs/train/runs/<date>/checkpoints/last.ckpt")
    e.add_argument("out_dir", help="directory to write (created if needed; files of an earlier export are replaced)")
    i = sub.add_parser("import", help="Hugging Face GPT-2 or Llama directory or hub id -> gptlab checkpoint")
    i.add_argument("source", help="a local Hugging Face GPT-2 or Llama directory, or a hub id such as gpt2")
    i.add_argument("out", help="checkpoint file to write, e.g. gpt2.ckpt")
    i.add_argument(
        "--tokenizer", default=None, metavar="NAME|FILE",
        help="the model's tokenizer, when the directory has no gptlab_tokenizer.json and no GPT-2 tokenizer "
             "files: a tiktoken encoding (gpt2) or the path of a gptlab_tokenizer.json",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "export":
            done = export_checkpoint(args.ckpt, args.out_dir)
        else:
            done = import_checkpoint(args.source, args.out, tokenizer=args.tokenizer)
    except GptlabError as e:  # FilesystemError included
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(done)
    return 0
