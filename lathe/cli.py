"""The `lathe` command. Exit codes: 0 success, 2 bad input, 3 failed validation, 130 Ctrl-C."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lathe.errors import BadInput, LatheError

# What each --int8-mode costs and buys (bench/results/minilm-onnx-int8-cpu.md): MiniLM int8, seq 128,
# 2 threads; min cosine against transformers fp32 over lathe's 300 sentences; latency ratio against
# onnxruntime's int8 recipe (quantize_dynamic on lathe's fp32 export, as `lathe bench` builds it; > 1 =
# faster) at batch 1 / 8 from one interleaved run on a machine shared by 5 helpers.
INT8_MODES_HELP = (
    "int8 on onnxruntime (MiniLM: min cosine vs fp32; speed vs onnxruntime's quantize_dynamic int8 at batch 1/8). "
    "fused (default): lathe's per-token math in onnxruntime's fused int8 GEMM: lathe's quality "
    "(0.9938 = lathe PyTorch; onnxruntime's best recipe 0.950), slower than onnxruntime's int8 (0.81x/0.85x). "
    "fast: per-tensor activations (DynamicQuantizeMatMul): 0.926, 0.91x/0.95x. "
    "hybrid: fast with the outlier layers per token: 0.985, 0.97x/0.98x. "
    "exact: the fused math in standard ONNX ops only (any runtime): 0.9938, 0.80x/0.85x. "
    "Table: bench/results/minilm-onnx-int8-cpu.md")

EXAMPLES = {
    "compress": "example:\n  lathe compress ./all-MiniLM-L6-v2 --recipe int8 -o ./minilm-int8\n"
                "  lathe compress ./model --recipe int4-awq --backend modelopt -o ./out-awq\n"
                "  lathe compress ./model --recipe my-recipe.yaml --calib texts.txt -o ./out",
    "export": "example:\n  lathe export ./minilm-int8 --to onnx -o minilm-int8.onnx\n"
              "  lathe export ./model --to onnx --opset 18 --no-validate -o model.onnx\n"
              "  lathe export ./minilm-int8 --to onnx --target tensorrt --lint tensorrt -o m.onnx\n"
              "  lathe export ./minilm-int8 --to tensorrt --opt-shapes input_ids:8x128,... -o m.engine",
    "bench": "example:\n  lathe bench ./minilm-int8 --batch 1,8 --seq 128 --json out.json\n"
             "  lathe bench compare before.json after.json --threshold 0.1\n"
             "  lathe bench kernels --json bench/results/kernels-cpu.json\n"
             "  lathe bench quantizers --out bench/results   # lathe vs ModelOpt calibration\n"
             "  lathe bench pruned ./minilm ./minilm-pruned --md t.md   # quality vs interleaved latency\n"
             "  lathe bench paired ./a ./b   # latency ratio b/a, timed alternately\n"
             "  lathe bench overhead   # per-op Python overhead on tiny tensors (target <= 10 us)\n"
             "  lathe bench ./llama-int4 --device cuda   # GPU: torch fp16 baseline vs lathe, CUDA-graphed decode",
    "demo": "example:\n  lathe demo -o lathe-demo-out",
}


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lathe", description="Compress, export and benchmark PyTorch models "
                                "on lathe's own kernels.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="run `lathe COMMAND --help` for each command's options and an example")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd")
    fmt = argparse.RawDescriptionHelpFormatter

    c = sub.add_parser("compress", help="compress a checkpoint with a recipe", epilog=EXAMPLES["compress"],
                       formatter_class=fmt)
    c.add_argument("src", help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    c.add_argument("--recipe", required=True, help="preset name (int8, int8-dynamic) or a recipe YAML file")
    c.add_argument("--calib", help="calibration text file, one text a line (default: stdlib docstrings)")
    c.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    c.add_argument("--force", action="store_true",
                   help="replace an existing output that is not a lathe checkpoint (never the source)")
    c.add_argument("--backend", choices=["lathe", "modelopt"], default="lathe",
                   help="who calibrates: lathe, or NVIDIA ModelOpt (int8, fp8, int4-awq; "
                        "pip install 'lathe[modelopt]'); the output runs on lathe's kernels either way")
    c.add_argument("--no-summary", action="store_true",
                   help="skip the size / quality / latency table printed after compressing")
    c.add_argument("--vllm-export", metavar="DIR",
                   help="also write DIR in the compressed-tensors layout vLLM reads (int8 W8A8 without "
                        "SmoothQuant, int4 without AWQ)")

    e = sub.add_parser("export", help="export to ONNX (validated on onnxruntime) or TensorRT",
                       epilog=EXAMPLES["export"], formatter_class=fmt)
    e.add_argument("src", help="Hugging Face model directory or lathe compressed directory")
    e.add_argument("--to", choices=["onnx", "tensorrt"], default="onnx")
    e.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="runtime whose patterns the quantized ops lower to (tensorrt: symmetric static QDQ)")
    e.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 18; 21 for --int8-mode fused on onnxruntime and for blocked int4/int8 "
                        "DequantizeLinear, 19 for FP8)")
    e.add_argument("--int8-mode", choices=["fused", "fast", "hybrid", "exact"], default="fused",
                   help=INT8_MODES_HELP)
    e.add_argument("--accuracy-level", type=int, default=4, choices=range(5),
                   help="int4 MatMulNBits accuracy_level (4: int8 activations, fastest; 0: fp32)")
    e.add_argument("--external-data", action="store_true",
                   help="weights in model.onnx.data beside the graph (automatic past 2 GB)")
    e.add_argument("--slim", action="store_true", help="simplify with onnxslim (pip install onnxslim)")
    e.add_argument("--calib-method", choices=["minmax", "percentile", "mse", "entropy"], default="minmax",
                   help="--target tensorrt: how the static activation amax is chosen (minmax: max |x|; "
                        "the others may clip outliers)")
    e.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    e.add_argument("--lint", choices=["tensorrt"], help="check the ONNX for TensorRT readiness (exit 3 on errors)")
    e.add_argument("--min-shapes", help="TensorRT profile, e.g. input_ids:1x1,attention_mask:1x1")
    e.add_argument("--opt-shapes", help="TensorRT profile, e.g. input_ids:8x128,attention_mask:8x128")
    e.add_argument("--max-shapes", help="TensorRT profile, e.g. input_ids:32x512,attention_mask:32x512")
    e.add_argument("--fp16", action="store_true", help="TensorRT: cast the graph to fp16 before the build")
    e.add_argument("--workspace-gb", type=float, default=4, help="TensorRT builder workspace limit")
    e.add_argument("--timing-cache", help="TensorRT timing cache file (read if present, then updated)")
    e.add_argument("-o", "--out", required=True, help="output file")
    e.add_argument("--force", action="store_true",
                   help="replace an existing file that lathe did not write (never a source file)")

    b = sub.add_parser("bench", help="latency and quality, many backends side by side",
                       epilog=EXAMPLES["bench"], formatter_class=fmt)
    b.add_argument("target", help="model directory, lathe compressed directory, .onnx or .engine file, "
                                  "`compare` or `kernels`")
    b.add_argument("rest", nargs="*", help="with `compare`: A.json B.json")
    b.add_argument("--backend", default=None,
                   help="comma-separated: torch,compile,lathe,lathe-fp32,onnxruntime,ort-int8,ort-int8-pc,lathe-onnx,"
                        "lathe-onnx-fast,lathe-onnx-hybrid,lathe-onnx-exact,torchao-int8,torchao-int4 "
                        "(torchao: pip install 'lathe[torchao]')")
    b.add_argument("--batch", type=_ints, default=[1, 8])
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--min-runs", type=int, default=100)
    b.add_argument("--min-seconds", type=float, default=10.0)
    b.add_argument("--json", help="write the JSON report here")
    b.add_argument("--out", default="lathe-bench-out", help="folder for report.{json,md,csv,png}")
    b.add_argument("--threshold", type=float, default=0.10, help="compare: regression threshold")
    b.add_argument("--quality-threshold", type=float, default=None,
                   help="compare: quality drop that is a regression (default: min cosine -0.005, "
                        "perplexity +1%%)")
    b.add_argument("--isolate", action="store_true", help="run each backend in its own process")
    b.add_argument("--prompt-len", type=int, default=128, help="decoders: prompt tokens")
    b.add_argument("--gen-len", type=int, default=32, help="decoders: generated tokens")
    b.add_argument("--threads", type=int, default=None, help="threads for every backend (pinned)")
    b.add_argument("--device", default="cpu",
                   help="cpu, or cuda: torch fp16 against lathe on the GPU (CUDA-graphed decode)")
    b.add_argument("--model-dir", default=None,
                   help="tokenizer/model directory for an .onnx/.engine target (default: MiniLM)")

    d = sub.add_parser("demo", help="the main job on the embedded all-MiniLM-L6-v2",
                       epilog=EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("-o", "--out", default="lathe-demo-out", help="output folder")
    d.add_argument("--min-runs", type=int, default=20)
    d.add_argument("--min-seconds", type=float, default=3.0)
    return p


def _compress(a):
    import logging

    import lathe
    from lathe.progress import Progress

    # distill's loss lines, and progress, from one process only under torchrun
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="lathe: %(message)s")
    from lathe.compress import distributed as dist

    if a.vllm_export:  # both outputs are checked before any work
        from lathe.io import check_output
        check_output(a.vllm_export, "compressed-tensors", [a.src], is_dir=True)
    out = lathe.compress_checkpoint(a.src, a.recipe, a.out, a.calib, progress=Progress() if main_rank else None,
                                    backend=a.backend, force=a.force)
    if not dist.is_main():  # under torchrun rank 0 wrote the output and reports it
        return 0
    print(f"wrote {out}")
    if a.vllm_export:
        from lathe.compress.vllm_config import export_compressed_tensors
        print(f"wrote {export_compressed_tensors(out, a.vllm_export)} (compressed-tensors)")
    if not a.no_summary:
        from lathe import summary
        print(summary.table(summary.summarize(a.src, out)))


def _export(a):
    if a.to == "tensorrt":
        from lathe.export.tensorrt import export_tensorrt
        out, _, _ = export_tensorrt(a.src, a.out, a.min_shapes, a.opt_shapes, a.max_shapes, a.fp16,
                                    a.workspace_gb, a.timing_cache, a.opset, validate=not a.no_validate,
                                    force=a.force)
        print(f"wrote {out}")
        return 0
    from lathe.source import open_source
    from lathe.vision import is_vision
    if is_vision(open_source(a.src)):  # CNNs: fp32 ONNX, or QDQ written from lathe's int8 model
        from lathe.export.vision import export as export_vision
        out, report = export_vision(a.src, a.out, a.target, validate_=not a.no_validate)
        print(f"validation: {report}" if report else "validation skipped")
        print(f"wrote {out}")
        if a.lint == "tensorrt":
            from lathe.errors import ValidationFailed
            from lathe.export.trt_lint import lint
            findings = lint(out, None)
            print(findings.summary())
            if findings.errors:
                raise ValidationFailed(f"TensorRT lint: {len(findings.errors)} error(s) in {out}")
        return 0
    from lathe.export.onnx import export_onnx

    out, report = export_onnx(a.src, a.out, a.target, a.opset, validate=not a.no_validate,
                              int8_mode=a.int8_mode, accuracy_level=a.accuracy_level,
                              external_data=True if a.external_data else None, slim=a.slim,
                              calib_method=a.calib_method, force=a.force)
    if report:
        print(report.summary())
    print(f"wrote {out}")
    if a.lint == "tensorrt":
        from lathe.errors import ValidationFailed
        from lathe.export.tensorrt import parse_profiles
        from lathe.export.trt_lint import lint
        findings = lint(out, parse_profiles(a.min_shapes, a.opt_shapes, a.max_shapes))
        print(findings.summary())
        if findings.errors and not a.no_validate:
            raise ValidationFailed(f"TensorRT lint: {len(findings.errors)} error(s) in {out} (first: "
                                   f"{findings.errors[0]})")
    return 0


def _bench(a):
    import json

    from lathe.bench.report import compare, table, write_all

    if a.target == "compare":
        return _bench_compare(a)
    if a.rest:
        raise BadInput(f"unexpected argument {a.rest[0]!r} (only `bench compare` takes two files)")
    from lathe.io import check_output, check_report_dir
    out = check_report_dir(Path(a.out))
    if a.json:
        check_output(a.json, "json", is_dir=False)
    from lathe import benchflow
    from lathe.source import open_source, resolve

    a.target = str(resolve(a.target))
    if a.device != "cpu":  # the GPU benchmark: torch fp16 against lathe (lathe.bench.gpu)
        return _bench_gpu(a)
    from lathe.models.generic import is_decoder_config

    if Path(a.target).is_dir() and is_decoder_config(open_source(a.target).config):
        return _bench_decoder(a)
    from lathe.bench.vision import RANDOM
    from lathe.vision import benchable
    if a.target in RANDOM or Path(a.target).is_dir() and benchable(open_source(a.target)):
        from lathe.bench.vision import run, table
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        doc = run(a.target, Path(a.out), tuple(a.backend.split(",")) if a.backend else
                  ("torch", "onnxruntime", "ort-int8", "lathe"), a.batch, max(3, a.min_runs // 10),
                  n_quality=16 if a.target in RANDOM else 128)  # random weights: quality says little
        if a.json:
            from lathe.io import atomic_file
            with atomic_file(Path(a.json)) as tmp:
                tmp.write_text(json.dumps(doc, indent=2))
        print(table(doc))
        return 0
    backends = tuple(a.backend.split(",")) if a.backend else benchflow.DEFAULT
    doc = benchflow.run(a.target, out, backends, a.batch, a.seq, a.min_runs, a.min_seconds,
                        isolate=a.isolate, threads=a.threads, model_dir=a.model_dir, device=a.device)
    paths = write_all(doc, out)
    if a.json:
        from lathe.io import atomic_file
        with atomic_file(Path(a.json)) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    print(table(doc))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _bench_gpu(a):
    import json

    from lathe.bench import gpu
    from lathe.io import atomic_file
    from lathe.source import open_source

    gpu.require_cuda(a.device)  # no GPU: one line, exit 2 (never a silent CPU run)
    if open_source(a.target).model_type == "llama":
        doc = gpu.run_decoder(a.target, a.device, a.batch[0], a.prompt_len, a.gen_len)
    else:
        doc = gpu.run_encoder(a.target, a.device, a.batch[-1], a.seq)
    print(gpu.table(doc))
    for path in [Path(a.out) / "report-gpu.json"] + ([Path(a.json)] if a.json else []):
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    print(f"wrote {Path(a.out) / 'report-gpu.json'}")
    return 0


def _bench_compare(a):
    import json
    import math

    from lathe.bench.report import compare

    if len(a.rest) != 2:
        raise BadInput("usage: lathe bench compare A.json B.json")
    for name, v in (("--threshold", a.threshold), ("--quality-threshold", a.quality_threshold)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise BadInput(f"{name} must be a finite number >= 0, got {v}")
    docs = []
    for f in a.rest:
        p = Path(f)
        if not p.exists():
            raise BadInput(f"no such file: {f}")
        if not p.is_file():
            raise BadInput(f"{f} is not a file")
        try:
            docs.append(json.loads(p.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            raise BadInput(f"{f} is not a bench JSON file (not UTF-8 text)") from None
        except json.JSONDecodeError as e:
            raise BadInput(f"{f} is not JSON: {e.msg}") from None
        except OSError as e:
            raise BadInput(f"cannot read {f}: {e.strerror}") from None
    try:
        text, regressed = compare(docs[0], docs[1], a.threshold, a.quality_threshold)
    except ValueError as e:
        raise BadInput(str(e)) from None
    print(text)
    return 1 if regressed else 0


def _bench_decoder(a):
    import json

    from lathe.bench import decoder
    from lathe.io import atomic_file

    doc = decoder.run(a.target, a.batch, a.prompt_len, a.gen_len, max(3, a.min_runs // 5), a.min_seconds,
                      backends=tuple(a.backend.split(",")) if a.backend else ())
    print(decoder.table(doc))
    out = Path(a.out)
    for path in [out / "report.json"] + ([Path(a.json)] if a.json else []):
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out / 'report.json'}")
    return 0


def _demo(a):
    from lathe import demo

    demo.run(a.out, a.min_runs, a.min_seconds)


# `lathe bench NAME ...`: benchmarks with their own options -> their module in lathe.bench
BENCH_TOOLS = {"kernels": "kernels", "quantizers": "quantizers", "paired": "paired", "overhead": "overhead",
               "pruned": "prune_tradeoff", "conv-layers": "conv_layers"}


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error that comes from the user's input, files or machine
    (exit 2), or None for lathe's own bugs."""
    import errno
    import json

    name = type(e).__name__
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {e.strerror} ({e.filename or 'writing the output'})"
        return f"{e.strerror or name}: {e.filename}" if e.filename else f"{e.strerror or e}"
    if isinstance(e, MemoryError) or name == "OutOfMemoryError":  # torch's (CUDA) one too
        return "out of memory"
    if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith("lathe"):
        return f"the Python package {e.name!r} is missing here: pip install it"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, json.JSONDecodeError):
        return f"a file is not valid JSON: {e.msg} at line {e.lineno}"
    first = str(e).splitlines()[0] if str(e) else name
    if name == "SafetensorError":  # safetensors' own I/O errors (disk full while saving, ...)
        return f"safetensors: {first}"
    if name in ("InvalidProtobuf", "DecodeError", "InvalidGraph", "NoSuchFile"):  # onnx / onnxruntime
        return f"invalid ONNX file: {first}"
    if name == "YAMLError" or any(c.__name__ == "YAMLError" for c in type(e).__mro__):
        return f"invalid YAML: {first}"
    return None


def _report_error(e: BaseException) -> int:
    if isinstance(e, LatheError):
        print(f"lathe: error: {e}", file=sys.stderr)
        return e.exit_code
    msg = user_error(e)
    if msg is not None:
        print(f"lathe: error: {msg}", file=sys.stderr)
        return 2
    if os.environ.get("LATHE_DEBUG"):
        raise e
    print(f"lathe: internal error (a bug in lathe, please report it with the command line): "
          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (LATHE_DEBUG=1 shows the "
          "traceback)", file=sys.stderr)
    return 1


def _interrupted() -> int:
    from lathe import io

    if io.completed:  # the output is complete and in place: the work is done
        print(f"lathe: interrupted after writing {io.completed[-1]} (complete)", file=sys.stderr)
        return 0
    print("lathe: interrupted", file=sys.stderr)
    return 130


def main(argv=None) -> int:
    from lathe import io

    io.completed.clear()
    try:
        return _main(argv)
    finally:
        import signal
        import threading
        if argv is None and threading.current_thread() is threading.main_thread():
            # run as the program, and the run is over: a Ctrl-C during interpreter shutdown
            # must not turn a finished run into exit -2 (callers passing argv keep their handler)
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCH_TOOLS:  # their own options (--help)
        import importlib
        try:
            return importlib.import_module(f"lathe.bench.{BENCH_TOOLS[argv[1]]}").main(argv[2:]) or 0
        except KeyboardInterrupt:
            return _interrupted()
        except Exception as e:  # noqa: BLE001 one line on stderr, as every command
            return _report_error(e)
    parser = _parser()
    a = parser.parse_args(argv)
    if a.version:
        import lathe
        print(f"lathe {lathe.__version__}")
        return 0
    if not a.cmd:
        parser.print_help()
        return 2
    from lathe.integrations import quiet_torchao
    try:
        with quiet_torchao():  # imported by transformers when installed: its CPU-only warnings
            rc = {"compress": _compress, "export": _export, "bench": _bench, "demo": _demo}[a.cmd](a)
        return rc or 0
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:  # noqa: BLE001 one line, not a 40-line traceback; LATHE_DEBUG=1 shows it
        return _report_error(e)


if __name__ == "__main__":
    sys.exit(main())
