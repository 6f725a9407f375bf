"""`lathe export SRC --to onnx -o DIR` (a folder, no .onnx suffix): what Optimum's ORTModel*
classes and transformers' Auto* tokenizers/configs read: DIR/model.onnx (and model.onnx.data),
config.json (the source's, without lathe's quantization_config: the graph holds the quantized
math itself), the tokenizer / processor files. Written to a temporary folder, renamed into place."""
from __future__ import annotations

import json
from pathlib import Path


def is_folder_target(out) -> bool:
    return Path(out).suffix.lower() != ".onnx"


def write_folder(source, out: Path, export_into) -> tuple:
    """export_into(model_onnx_path) -> (path, report); returns (out, report)."""
    from lathe.io import atomic_dir
    from lathe.integrations.hf_files import carry_files

    out = Path(out)
    with atomic_dir(out) as tmp:
        _, report = export_into(tmp / "model.onnx")
        cfg = {k: v for k, v in source.config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        carry_files(source.path, tmp)
    return out, report
