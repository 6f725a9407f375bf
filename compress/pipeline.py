"""The compress flow: open the source, run the recipe's steps, save atomically (lathe.compress_checkpoint)."""
from __future__ import annotations

from pathlib import Path

from lathe.errors import BadInput


def calibration_batches(src_path, calib_file=None, n: int = 128, batch_size: int = 16):
    from lathe import text

    texts = text.read_lines(calib_file) if calib_file else list(text.calibration_texts(n))
    tok = text.Tokenizer(src_path)
    return text.batches(tok, texts, batch_size=batch_size, seq_len=128)


def work_dir_for(out: Path) -> Path:
    """Where a run keeps state that lets it resume (distillation checkpoints): beside the
    output, named after it, removed once the output is complete."""
    return out.parent / f".{out.name}.work"


def _teacher_source(source, rec):
    """A chained run's distillation teacher: the original model the manifest records (so
    distilling a pruned checkpoint further still learns from the original), or, when that is
    gone or changed, the checkpoint itself, with a warning."""
    import logging

    from lathe.source import original_of

    if not source.is_compressed or not any(getattr(s, "method", "") == "distill" for s in rec.steps):
        return None
    orig = original_of(source)
    if orig is None:
        logging.getLogger("lathe.compress").warning(
            "the original model recorded in %s (%s) is missing or changed: distilling from %s itself",
            source.path, source.manifest.get("source", {}).get("path"), source.path)
    return orig


def compress_checkpoint(src, recipe, out, calib=None, progress=None, backend: str = "lathe") -> Path:
    """backend: "lathe" (lathe's own calibration) or "modelopt" (NVIDIA ModelOpt calibrates,
    lathe.compress.modelopt_backend converts the result into lathe's modules)."""
    import shutil

    from lathe.compress import distributed as dist
    from lathe.compress.checkpoint import build_model, save
    from lathe.compress.context import StepContext
    from lathe.compress.quantize import quantize
    from lathe.compress.recipes import Recipe, load_recipe
    from lathe.source import open_source, writable_parent

    dist.init_from_env()  # under torchrun: join the group (calibration / distillation reduce)
    if backend not in ("lathe", "modelopt"):
        raise BadInput(f"unknown backend {backend!r}; expected lathe or modelopt")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    source = open_source(src)
    if source.is_compressed and (source.manifest.get("modules") or source.manifest.get("transforms")):
        raise BadInput(f"{src} holds lathe quantized/fused modules; compress the original (a pruned or "
                       "distilled checkpoint without quantization can be compressed further)")
    out = writable_parent(out)
    if out.exists() and out.resolve() == source.path.resolve():
        raise BadInput("the output directory must differ from the source checkpoint")
    batches = calib if calib is not None and not isinstance(calib, (str, Path)) else \
        calibration_batches(source.path, calib)
    if len(batches) >= dist.world():  # each rank calibrates on its share; statistics are reduced
        batches = dist.shard(batches)
    if backend == "modelopt":  # NVIDIA ModelOpt calibrates; lathe converts and saves
        from lathe.compress.modelopt_backend import run_recipe

        model, report = run_recipe(source, rec, batches, progress)
        return save(model, source, out, rec.to_dict(), report)
    if source.is_compressed:  # e.g. int8 on a pruned + distilled checkpoint: record both recipes
        rec = Recipe(name=f"{source.manifest['recipe'].get('name', 'parent')}+{rec.name}", steps=rec.steps)
    model = build_model(source)
    ctx = StepContext(source=source, calib=batches, progress=progress, work_dir=work_dir_for(out),
                      teacher_source=_teacher_source(source, rec))
    reports = [quantize(model, step, batches, progress, ctx) for step in rec.steps]
    if dist.is_main():  # one writer; the other ranks hold the same model
        save(model, source, out, rec.to_dict(), {"backend": "lathe", "steps": reports})
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    dist.barrier()
    return out
