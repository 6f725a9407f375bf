"""Importing lathe never initialises CUDA and never needs a GPU, TensorRT or _C_cuda."""
import subprocess
import sys

CODE = r"""
import sys
# None in sys.modules makes any import of these raise ImportError, as if not installed.
for name in ('tensorrt', 'modelopt', 'lathe._C_cuda'):
    sys.modules[name] = None
import lathe
assert 'torch' not in sys.modules, 'import lathe pulled in torch'
import torch
import lathe.kernels, lathe.compress, lathe.export, lathe.bench, lathe.cli
from lathe import _ext
assert _ext.cuda() is None
assert not torch.cuda.is_initialized()
print('ok')
"""


def test_import_lathe_without_cuda():
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ----------------------------------------------------------------------------- layering
# Imports flow one way: core -> kernels -> models -> compress -> export -> bench -> cli. A module
# may import its own layer or any layer left of it, never one to its right, at module level or
# inside a function. `lathe.load(...)` and the other root verbs count as imports of the layer
# that implements them.
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

LAYERS = ("core", "kernels", "models", "compress", "export", "bench", "cli")
ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"kernels": "lathe.kernels", "compress": "lathe.compress", "export": "lathe.export",
           "bench": "lathe.bench", "lathe": "lathe"}
CORE = {"lathe", "lathe.errors", "lathe._ext", "lathe._C", "lathe._C_cuda", "lathe.progress", "lathe.text",
        "lathe.source", "lathe.corpus", "lathe.io"}
VERBS = {"load": "lathe.compress", "compress_checkpoint": "lathe.compress", "export_onnx": "lathe.export"}
# Modules in lathe/ outside the layer folders that sit below cli: placed by what they import.
PLACED = {"lathe.images": "core", "lathe.integrations": "models", "lathe.integrations.hf_files": "models",
          "lathe.integrations.transformers_quantizer": "compress", "lathe.vision": "compress"}


def layer_of(module: str) -> str | None:
    if module != "lathe" and not module.startswith("lathe."):
        return None
    if module in CORE:
        return "core"
    if module in PLACED:
        return PLACED[module]
    sub = module.split(".")[1]
    return sub if sub in LAYERS else "cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]]
    if path.name != "__init__.py":
        parts.append(path.stem)
    return ".".join(parts)


def _imports(path: Path, module: str):
    """(line, imported module) of every import in the file, relative ones resolved; the root
    verbs (lathe.load(...)) as imports of their layer."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for a in node.names:  # `from lathe import text` imports lathe.text
                yield node.lineno, f"{base}.{a.name}" if base == "lathe" else base
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lathe" \
                and node.attr in VERBS:
            yield node.lineno, VERBS[node.attr]


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            module = _module_name(path)
            # lathe/__init__.py is the public API (top); importing bare `lathe` is cheap (core)
            here = "cli" if module == "lathe" else layer_of(module)
            for line, target in _imports(path, module):
                there = layer_of(target)
                if there is not None and LAYERS.index(there) > LAYERS.index(here):
                    bad.append(f"{path.relative_to(root)}:{line} ({here}) imports {target} ({there})")
    return bad


def test_no_import_runs_upward():
    bad = upward_imports()
    assert not bad, "imports must flow " + " -> ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_layering_check_catches_an_upward_import(tmp_path):
    """The check itself: a kernel module that imports compress is reported."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "kernels" / "leak.py").write_text("def f():\n    from lathe.compress.quantize import sqnr_db\n")
    (tmp_path / "compress" / "verb.py").write_text("import lathe\nlathe.export_onnx('a', 'b')\n")
    (tmp_path / "compress" / "fine.py").write_text("from lathe.kernels import ops\nfrom lathe import errors\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        bad = upward_imports(tmp_path)
    finally:
        ROOT = saved
    assert bad == ["kernels/leak.py:2 (kernels) imports lathe.compress.quantize (compress)",
                   "compress/verb.py:2 (compress) imports lathe.export (export)"]
