"""Hugging Face GPT-2 and Llama in and out of gptlab.

    pretrained_model_cfg(init_from, model_cfg, overrides)   train.py's model.init_from: the checkpoint's shape
    load_pretrained_into(model, path_or_id)   ... and its weights: HF directory, hub id or .ckpt
    load_hf_model(directory) -> (model, tokenizer)   sample.py ckpt_path=<HF directory>
    export_checkpoint(ckpt, out_dir)          gptlab .ckpt -> HF directory (weights, config, tokenizer)
    import_checkpoint(dir_or_id, out_ckpt)    HF directory or hub id -> gptlab .ckpt
    export_hf(model, out_dir, tokenizer)      a model in memory -> HF directory

and the same on the command line: `python -m gptlab.hf export|import ...` (gptlab/hf/cli.py).
A directory with config.json `model_type: llama` is LlamaForCausalLM, any other GPT2LMHeadModel; a
model with `pos=rope` exports as Llama, any other as GPT-2 (gptlab/hf/convert.py decides both).
Modules: gpt2 and llama (config/key/shape conversion), weights (finding and reading a directory),
tokenizer (which vocabulary a directory holds), export (writing a directory, all or nothing),
pretrained (the shape of a run from a checkpoint), convert (the functions above). safetensors,
tokenizers and huggingface_hub are imported lazily, only when used (`pip install -e ".[hf]"`).
"""

from gptlab.hf.convert import (
    export_checkpoint, export_hf, import_checkpoint, load_hf_model, load_pretrained_into, pretrained_model_cfg,
)

__all__ = ["export_checkpoint", "export_hf", "import_checkpoint", "load_hf_model", "load_pretrained_into",
           "pretrained_model_cfg"]
