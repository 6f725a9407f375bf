"""The compress flow: open the source, run the recipe's steps, save atomically (lathe.compress_checkpoint)."""
from __future__ import annotations

from pathlib import Path

from lathe.errors import BadInput


def calibration_batches(src_path, calib_file=None, n: int = 128, batch_size: int = 16):
    from lathe import models, text
    from lathe.models.generic import image_batches, takes_pixels
    from lathe.source import open_source

    config = open_source(src_path).config
    if takes_pixels(config):  # a vision model: synthetic images (see image_batches)
        if calib_file:
            raise BadInput("--calib takes text; calibrate a vision model through the Python API (calib=[batches])")
        return image_batches(config, n=32)

    texts = text.read_lines(calib_file) if calib_file else list(text.calibration_texts(n))
    tok = models.tokenizer(src_path)
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


def compress_checkpoint(src, recipe, out, calib=None, progress=None, backend: str = "lathe",
                        force: bool = False) -> Path:
    """backend: "lathe" (lathe's own calibration) or "modelopt" (NVIDIA ModelOpt calibrates,
    lathe.compress.modelopt_backend converts the result into lathe's modules).

    Everything is checked before any work: the recipe in full, the source, and the output
    (lathe.io.claim: never a path holding something lathe did not write, unless force; never
    one that contains the source or lies inside a source file). The output is locked for the
    run, so a second run on it exits at once."""
    import contextlib

    from lathe.compress import distributed as dist
    from lathe.compress.recipes import Recipe, check_order, load_recipe
    from lathe.io import claim
    from lathe.source import open_source

    dist.init_from_env()  # under torchrun: join the group (calibration / distillation reduce)
    if backend not in ("lathe", "modelopt"):
        raise BadInput(f"unknown backend {backend!r}; expected lathe or modelopt")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_order(rec.steps, f"recipe {rec.name}")  # also for a Recipe built in Python
    source = open_source(src)
    if source.is_compressed and (source.manifest.get("modules") or source.manifest.get("transforms")):
        raise BadInput(f"{src} holds lathe quantized/fused modules; compress the original (a pruned or "
                       "distilled checkpoint without quantization can be compressed further)")
    if isinstance(calib, (str, Path)):
        from lathe import text
        text.read_lines(calib)  # a missing or unreadable file fails here, before any work
    out = Path(out)
    # one writer under torchrun: rank 0 holds the lock, the other ranks only compute
    guard = claim(out, "compressed", [source.path], force) if dist.is_main() else contextlib.nullcontext(out)
    with guard:
        return _compress(source, rec, out, calib, progress, backend)


def _compress(source, rec, out, calib, progress, backend) -> Path:
    import shutil

    from lathe.compress import distributed as dist
    from lathe.compress.checkpoint import build_model, save
    from lathe.compress.context import StepContext
    from lathe.compress.quantize import quantize
    from lathe.compress.recipes import Recipe

    from lathe import vision
    if vision.is_vision(source):  # CNNs: image calibration, conv int8 / channel pruning
        return vision.compress(source, rec, out, progress)
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
    if callable(getattr(model, "check_supported", None)):  # generic: exit 2 naming what it cannot quantize
        model.check_supported(rec.steps)
    ctx = StepContext(source=source, calib=batches, progress=progress, work_dir=work_dir_for(out),
                      teacher_source=_teacher_source(source, rec))
    reports = [quantize(model, step, batches, progress, ctx) for step in rec.steps]
    if dist.is_main():  # one writer; the other ranks hold the same model
        save(model, source, out, rec.to_dict(), {"backend": "lathe", "steps": reports})
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    dist.barrier()
    return out
