"""Segment a volume file (or DICOM folder) into a label volume with its sidecar: the `segment` job.

Every check that needs no model comes first, before torch is imported; the output and its
sidecar are claimed before any work and written in one atomic step at the end, so a refused,
failed or cancelled run leaves nothing behind and never replaces an input.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InputError
from ..model.slice_smoothing import DEFAULT_SLICE_SMOOTHING_MM
from ..runtime.progress import Progress
from .options import ModelOptions, RunOptions, check_range, check_ranges
from .preparation import adapter_path, declare_inputs, device_and_dtype, load, open_library, read_adapter


def segment_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    classes: str | None = None,
    model: ModelOptions = ModelOptions(),
    run: RunOptions = RunOptions(),
    slice_smoothing: float = DEFAULT_SLICE_SMOOTHING_MM,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment every slice of ``input`` and write the label volume ``output`` (.nrrd, .nii.gz, .mha)
    with a sidecar .json of class names and colours beside it. Returns what was written and how.

    ``slice_smoothing``: mm; each slice's class probabilities are averaged with its neighbours'
    (model/slice_smoothing.py); 0: every slice on its own."""
    from ..io.outputs import Claims
    from ..io.read import read_image
    from ..io.slices import check_slices_are_images, choose_preset
    from ..io.write import check_can_store

    progress = progress or Progress("none")
    check_ranges(model, run)
    check_range("slice_smoothing", slice_smoothing, required=True)
    library = open_library(model)
    adapter = adapter_path(model, library)
    claims = Claims(overwrite=run.overwrite)
    declare_inputs(claims, model, adapter, {"the input image": [input]})
    out, sidecar = claims.image_output(output)
    meta, model, run = read_adapter(model, run, adapter)
    if adapter is None and model.checkpoint is None:
        raise InputError(
            "segment needs an adapter (--adapter NAME or FILE): a base model's class head is "
            "untrained, so its labels would mean nothing; train one with `hfsam finetune` "
            "(`hfsam models list` shows the library's)"
        )
    if classes is not None:
        from ..model.classes import resolve_classes

        wanted = [c["name"] for c in resolve_classes(classes)]
        if meta is not None and adapter is not None and wanted != [c["name"] for c in meta["classes"]]:
            raise InputError(
                f"adapter {adapter.name} segments {', '.join(c['name'] for c in meta['classes'])}; "
                "--classes cannot rename or change them (fine-tune a new adapter instead)"
            )
    image = read_image(input, warn=progress.warn)
    check_can_store(image, out)
    check_slices_are_images(image, run.axis, str(input))
    if meta is not None and "preset" not in run.chosen:
        looks = choose_preset(image)
        if looks != run.preset:
            progress.warn(
                f"this image looks like {looks.upper()} but the adapter was trained on {run.preset.upper()}; "
                f"using the {run.preset} preset the adapter needs"
            )
    with claims.hold() as writes:
        return _segment(input, image, out, sidecar, classes, model, run, slice_smoothing, library, writes, progress)


def _segment(
    input,
    image,
    output,
    sidecar,
    classes,
    model: ModelOptions,
    run: RunOptions,
    slice_smoothing: float,
    library,
    writes,
    progress: Progress,
) -> dict[str, Any]:
    from ..io.write import data_files, write_image
    from ..model.inference import segment_image

    device, dtype = device_and_dtype(run)
    lm = load(model, classes=classes, library=library, progress=progress)
    if not model.adapter and lm.base.get("sha256"):
        progress.warn(
            "no adapter given: the class head is untrained, so the result is not meaningful; "
            "fine-tune one with `hfsam finetune` or pass --adapter"
        )
    labels, info = segment_image(
        image,
        lm.model,
        preset=run.preset,
        axis=run.axis,
        batch_size=run.batch_size,
        device=device,
        dtype=dtype,
        progress=progress,
        class_values=[c["value"] for c in lm.classes],
        slice_smoothing_mm=slice_smoothing,
    )
    progress.check_cancelled()  # a cancel that came after the last batch still means "write nothing"
    if info["labeled_voxels"] == 0:
        names = ", ".join(c["name"] for c in lm.classes)
        progress.warn(
            f"EVERY VOXEL CAME OUT AS BACKGROUND: none of the {len(lm.classes)} class(es) ({names}) was "
            f"found in any of the {info['slices']} slices. Do not read this as 'not present': if the "
            "structures are in the scan, this model does not fit it (another modality, body region or "
            "slice axis?)"
        )
    # One atomic step for both files; the label volume is renamed last, so once it exists
    # under its name its sidecar is complete too.
    writes.replacing(output, sidecar, *data_files(output))
    write_image(
        labels,
        output,
        overwrite=run.overwrite,
        sidecar={
            "output": output.name,
            "classes": lm.classes,
            "model": lm.describe(),
            "input": str(input),
            "run": info,
        },
    )
    progress.log(f"wrote {output} ({info['slices']} slices, {info['device']}, {info['precision']}) and {sidecar.name}")
    return {"output": str(output), "sidecar": str(sidecar), "classes": lm.classes, **info}
