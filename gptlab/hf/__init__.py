"""Hugging Face GPT-2 in and out of gptlab.

    load_pretrained_into(model, path_or_id)   train.py's model.init_from: HF directory, hub id or .ckpt
    load_hf_model(directory) -> (model, tokenizer)   sample.py ckpt_path=<HF directory>
    export_checkpoint(ckpt, out_dir)          gptlab .ckpt -> HF directory (weights, config, tokenizer)
    import_checkpoint(dir_or_id, out_ckpt)    HF directory or hub id -> gptlab .ckpt

and the same on the command line: `python -m gptlab.hf export|import ...` (gptlab/hf/cli.py).
Modules: gpt2 (config/key/shape conversion), weights (finding and reading a directory), tokenizer
(which vocabulary a directory holds), export (writing a directory, all or nothing), convert (the
functions above). safetensors, tokenizers and huggingface_hub are imported lazily, only when used
(`pip install -e ".[hf]"`).
"""

from gptlab.hf.convert import export_checkpoint, import_checkpoint, load_hf_model, load_pretrained_into

__all__ = ["export_checkpoint", "import_checkpoint", "load_hf_model", "load_pretrained_into"]
