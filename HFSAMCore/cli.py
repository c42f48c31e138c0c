"""`hfsam`: the command-line front end. Thin: every command calls into the modules beside it.

Exit codes: 0 done, 2 bad input (one line on stderr, nothing written),
130 cancelled, 1 anything else. With ``--progress json`` stdout carries one JSON
event per line (DESIGN.md, "Progress protocol"); logs always go to stderr.
Heavy imports (torch, SAM) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

from . import __version__
from .errors import Cancelled, HFSAMError, HFSAMWarning, InputError, is_out_of_memory
from .malloc import keep_freed_memory
from .options import OneLineParser, UsageError, check_options, progress_mode
from .model.registry import DEFAULT_FEWSHOT_METHODS, FEWSHOT_METHODS, FUSIONS, backbone_names, pretrained_backbones
from .progress import Progress

DESCRIPTION = """\
HF-SAM: few-shot medical image segmentation with a LoRA-tuned Segment Anything Model,
an adaptive weighted feature-fusion module and a two-step skip-fusion decoder
(Liu & Xu, CVIU 2025). The engine of the HF-SAM 3D Slicer extension.

commands:
  segment    segment every slice of a CT/MR volume (file or DICOM folder)
  finetune   train a new adapter from a few labeled slices
  evaluate   Dice and HD95 (mm) of a prediction against a reference label map
  info       architecture summary and parameter counts
  models     the local model library: adapters and base SAM checkpoints
  demo       the whole job on the sample CT: fine-tune on 5 slices, segment, evaluate
  train      train on a dataset (Synapse, ACDC, NIfTI folders); torchrun for many GPUs
  evaluate-dataset  per case/class Dice and HD95 on a test set, laid out like the paper's table
  bench      speed / memory / few-shot benchmarks (writes a results table)

exit codes: 0 done, 2 bad input, 130 cancelled, 1 other error.
Run `hfsam COMMAND --help` for each command's options and an example."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


# -- shared option groups -------------------------------------------------------
class _Explicit(argparse.Action):
    """Store the value and note that the user typed it: an adapter fixes the model's
    architecture, so an explicit --backbone/--img-size/--rank/--fusion that contradicts
    it is an error, while the defaults simply give way."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, "explicit", set(getattr(namespace, "explicit", ()) or ()) | {self.dest})


# Options an adapter fixes: argparse dest -> (option, adapter metadata field). Its architecture (its
# tensors fit only that model) and everything that changes what the model sees: slice axis,
# intensity preset, input size. A value the user typed that contradicts the adapter is refused
# (see _adapter_metadata); a default, or "auto", gives way to the adapter's value.
ADAPTER_FIXES = {"backbone": ("--backbone", "backbone"), "img_size": ("--img-size", "img_size"),
                 "rank": ("--rank", "rank"), "fusion": ("--fusion", "fusion"),
                 "axis": ("--axis", "axis"), "preset": ("--preset", "intensity_preset")}


def _add_model_args(p: argparse.ArgumentParser, *, adapter_help: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--adapter", metavar="A", help=adapter_help)
    g.add_argument("--checkpoint", metavar="C",
                   help="SAM base checkpoint file; default: the library's for the backbone; "
                        "'none' = random initialisation (tests and benchmarks only)")
    g.add_argument("--backbone", default="auto", choices=("auto", *backbone_names()), action=_Explicit,
                   help="image encoder; auto: SAM vit_b when its checkpoint is in the library, else lite_medsam "
                        "(LiteMedSAM, installed with HF-SAM); with --adapter: the adapter's (another value is refused)")
    g.add_argument("--img-size", type=int, action=_Explicit,
                   help="model input size in pixels (default: the backbone's, 512 for SAM ViT (or 224), 256 for "
                        "LiteMedSAM; with --adapter: the adapter's)")
    g.add_argument("--rank", type=int, default=5, action=_Explicit, help="LoRA rank (with --adapter: the adapter's)")
    g.add_argument("--fusion", default="two_step", choices=tuple(FUSIONS), action=_Explicit,
                   help="; ".join(f"{k}: {v}" for k, v in FUSIONS.items()))
    g.add_argument("--library", metavar="DIR", help="model library folder (default: $HFSAM_HOME or ~/.hfsam)")


def _add_run_args(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA (fp16 on GPUs without bf16) and on CPUs with bf16 instructions, else fp32")
    g.add_argument("--batch-size", type=int, default=batch_size, help="slices per batch")
    g.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"], action=_Explicit,
                   help="slice direction, in patient terms (whatever the voxel order); with --adapter: the adapter's")
    g.add_argument("--preset", default="auto", choices=["auto", "ct", "mr"], action=_Explicit,
                   help="intensity preset; auto chooses from the data (DICOM modality, HU range); "
                        "with --adapter: the adapter's")
    g.add_argument("--progress", default="auto", choices=["auto", "json", "tty", "none"],
                   help="json: one event per line on stdout (for the Slicer module); tty: a bar on stderr")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _sub(subparsers, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_, description=help_, epilog="example:\n  " + example,
                                 formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    from .model.registry import PIXEL_NORMS

    parser = OneLineParser(prog="hfsam", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"hfsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _sub(sub, "segment", "Segment every slice of a volume and write a label volume with its geometry.",
             "hfsam segment ct.nii.gz -o seg.nrrd --adapter liver5\n"
             "  hfsam segment dicom_folder/ -o seg.nrrd --checkpoint none --backbone tiny   # random test model")
    p.add_argument("input", help="image file (NIfTI, NRRD, MHA) or a DICOM series folder (folder::SERIES_UID "
                                 "when it holds several)")
    p.add_argument("-o", "--output", required=True, help="label volume to write (.nrrd, .nii.gz, .mha); "
                                                         "a sidecar .json with class names and colours is written beside it")
    p.add_argument("--classes", help="class preset (synapse, acdc) or names 'a,b,c' (without --adapter)")
    _add_model_args(p, adapter_help="adapter: a library name or a .safetensors file")
    _add_run_args(p, batch_size=4)
    p.set_defaults(func=cmd_segment)

    p = _sub(sub, "finetune", "Train an HF-SAM adapter on the labeled slices of one volume.",
             "hfsam finetune ct.nii.gz liver_labels.nii.gz -o liver.safetensors --slices 10,15,20 --classes liver\n"
             "  hfsam finetune ct.nii.gz labels.nii.gz --name synapse5 --classes synapse --slices auto --minutes 10")
    p.add_argument("image", help="image file or DICOM folder")
    p.add_argument("labels", nargs="+", help="one label map (values 1..K) or K binary masks (one per class); "
                                             "brought onto the image grid by physical position")
    p.add_argument("-o", "--output", help="adapter file to write (.safetensors)")
    p.add_argument("--name", help="also store the adapter in the model library under this name")
    p.add_argument("--slices", default="auto",
                   help="slice indices to train on ('12,15,20', '10-14') along the volume's own slice axis, "
                        "or 'auto' = every slice that carries a label")
    p.add_argument("--classes", help="class names in label order ('liver,spleen') or a preset (synapse, acdc); "
                                     "default: 'label_1'..'label_K'")
    p.add_argument("--steps", type=int, help="training steps (default: the backbone's few-shot recipe, 300 "
                                             "for lite_medsam, 1000 for vit_b, unless --minutes is given)")
    p.add_argument("--minutes", type=float, help="wall-clock budget instead of (or as well as) --steps")
    p.add_argument("--cached-steps", type=int, metavar="N",
                   help="the first N steps train the decoder, AWFFM and compression conv on encoder features "
                        "computed once (5x cheaper on a CPU; exact, LoRA does not train in them); "
                        "default: the recipe's share (lite_medsam: all of them, so LoRA does not train; on a GPU try "
                        "--cached-steps 0 = every step end to end, LoRA included)")
    p.add_argument("--lr", type=float, default=0.0025, help="base learning rate (AdamW)")
    p.add_argument("--holdout", type=int, help="labeled slices held out for a Dice check "
                                               "(default: 1 when at least 5 are labeled, else 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic on the CPU)")
    p.add_argument("--description", default="", help="free text stored in the adapter")
    _add_model_args(p, adapter_help="continue training this adapter (library name or file)")
    _add_run_args(p, batch_size=4)
    p.set_defaults(func=cmd_finetune)

    p = _sub(sub, "evaluate", "Dice and HD95 (mm) per class of a prediction against a reference label map.",
             "hfsam evaluate --reference labels.nii.gz --prediction seg.nrrd --classes synapse --json")
    p.add_argument("--reference", required=True, help="reference label map (brought onto the prediction's grid "
                                                      "by physical position)")
    p.add_argument("--prediction", required=True, help="predicted label map")
    p.add_argument("--classes", help="class preset or names; default: the prediction's sidecar JSON, else numbers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--progress", default="auto", choices=["auto", "json", "tty", "none"],
                   help="json: one event per line on stdout, the scores being the result event")
    p.set_defaults(func=cmd_evaluate)

    p = _sub(sub, "info", "Architecture summary with total, trainable and LoRA parameter counts.",
             "hfsam info --backbone vit_b --img-size 512 --classes 8 --rank 5 --json")
    p.add_argument("--backbone", default="vit_b", choices=backbone_names())
    p.add_argument("--img-size", type=int, help="default: the backbone's (vit_b 512, lite_medsam 256)")
    p.add_argument("--classes", default="8", help="number of classes, a preset or names")
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--fusion", default="two_step", choices=tuple(FUSIONS))
    p.add_argument("--pixel-norm", choices=list(PIXEL_NORMS), help="default: the backbone's own")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = _sub(sub, "demo", "The main job on the sample CT: fine-tune on a few labeled slices, segment every "
                          "slice, evaluate on the others, write the segmentation, a figure and a Dice table.",
             "hfsam demo --output demo_output")
    p.add_argument("--output", default="demo_output", help="folder for the results")
    p.add_argument("--labeled-slices", type=int, default=5, help="how many labeled slices to train on")
    p.add_argument("--steps", type=int, help="training steps (default: the backbone's few-shot recipe)")
    p.add_argument("--backbone", choices=("auto", *pretrained_backbones(), "tiny"), default="auto",
                   help="auto: SAM vit_b with its checkpoint and a CUDA GPU, else LiteMedSAM; "
                        "tiny: the random-init test model")
    p.add_argument("--device", default="auto")
    p.add_argument("--library", metavar="DIR")
    p.add_argument("--progress", default="auto", choices=["auto", "json", "tty", "none"])
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --output")
    p.set_defaults(func=cmd_demo)

    from . import cli_models

    cli_models.add_parser(sub)

    from . import cli_dataset

    cli_dataset.add_parsers(sub)

    p = _sub(sub, "bench", "Benchmarks: machine ceiling, FLOPs, inference and fine-tuning speed, memory, "
                           "and few-shot Dice for N labeled slices. Writes Markdown and JSON.",
             "hfsam bench speed --backbone lite_medsam -o benchmarks/results\n"
             "  hfsam bench fewshot -o benchmarks/results            (LiteMedSAM: HF-SAM, decoder only, U-Net)\n"
             "  hfsam bench fewshot --n 5 --methods hfsam --steps 100")
    p.add_argument("which", choices=["speed", "fewshot"])
    p.add_argument("-o", "--output", default="benchmarks/results", help="folder for the result files")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run); fewshot: N = 1 and 5 only")
    p.add_argument("--n", type=int, nargs="+", metavar="N", help="fewshot: numbers of labeled slices "
                                                                  "(default 1 3 5 10)")
    p.add_argument("--methods", nargs="+", choices=tuple(FEWSHOT_METHODS), metavar="METHOD",
                   help="fewshot: rows per N (default: " + ", ".join(DEFAULT_FEWSHOT_METHODS) + "; also hfsam_lora)")
    p.add_argument("--steps", type=int, help="fewshot: training steps (default: the backbone's recipe; U-Net 500)")
    p.add_argument("--jobs", type=int, default=1, help="fewshot: rows run at once, each on cores/JOBS threads")
    p.add_argument("--volume", help="volume for the whole-segment timing (default: the DICOM sample)")
    _add_model_args(p, adapter_help="(unused)")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="auto", choices=["auto", "json", "tty", "none"])
    p.set_defaults(func=cmd_bench)
    return parser


# -- helpers ---------------------------------------------------------------------
def _library(args):
    from .library import ModelLibrary

    return ModelLibrary(getattr(args, "library", None))


def _adapter_path(args, library) -> Path | None:
    """The --adapter's file (None without one); a missing adapter is refused here, before anything."""
    return library.resolve_adapter(args.adapter) if getattr(args, "adapter", None) else None


def _adapter_metadata(args, path: Path | None) -> dict | None:
    """The adapter's validated metadata (None without one), read without torch, so that a wrong or
    broken adapter is refused before anything loads. Every option the adapter fixes (ADAPTER_FIXES)
    is then taken from it: one the user typed that contradicts it is refused."""
    if path is None:
        return None
    from .adapters import check_finite_tensors, read_metadata

    meta = read_metadata(path)
    check_finite_tensors(path)
    typed = getattr(args, "explicit", None) or set()
    fixed = [(dest, option, field) for dest, (option, field) in ADAPTER_FIXES.items() if hasattr(args, dest)]
    wrong = [f"{option} {getattr(args, dest)}" for dest, option, field in fixed
             if dest in typed and getattr(args, dest) not in (meta[field], "auto")]
    if wrong:
        trained = ", ".join(f"{option[2:]} {meta[field]}" for _, option, field in fixed)
        raise InputError(f"adapter {path.name} was trained for {trained}, not {', '.join(wrong)}: drop the option "
                         "(an adapter fixes the model and what it sees) or choose an adapter trained for it")
    for dest, _, field in fixed:
        setattr(args, dest, meta[field])
    return meta


def _run_inputs(claims, args, adapter: Path | None, images: dict[str, list]) -> None:
    """Declare what the run reads, so that no output can replace it (outputs.Claims)."""
    from .integrity import input_files

    for what, sources in images.items():
        for source in sources:
            claims.inputs(what, input_files(source))
    if adapter is not None:
        claims.inputs("the adapter this run reads", [adapter])
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and str(checkpoint).lower() != "none":
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            raise InputError(f"--checkpoint {path} is a folder; give the checkpoint file (.pth)")
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        with open(path, "rb") as fh:
            head = fh.read(16)
        # torch.save writes a zip (or, before torch 1.6, a pickle); safetensors starts with a header length.
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[8:9] == b"{"):
            raise InputError(f"--checkpoint {path} is not a PyTorch or safetensors checkpoint (its content is neither): "
                             "use an official SAM checkpoint (.pth)")
        claims.inputs("the checkpoint", [path])


def _device_and_dtype(args):
    from .device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    return device, resolve_precision(getattr(args, "precision", "auto"), device)


def _warn_outside(progress: Progress, labels, grid, what: str, where: str, then: str) -> tuple[int, int]:
    from .volume import describe_outside, labels_outside

    outside, total = labels_outside(labels, grid)
    note = describe_outside(outside, total, what, where)
    if note:
        progress.warn(f"{note}: {then}")
    return outside, total


# -- commands --------------------------------------------------------------------
def cmd_segment(args, progress: Progress) -> int:
    from .outputs import Claims
    from .slices import check_slices_are_images, choose_preset
    from .volume import check_can_store, read_image

    # Every check that needs no model comes first, before torch is even imported.
    library = _library(args)
    adapter = _adapter_path(args, library)
    claims = Claims(overwrite=args.overwrite)
    _run_inputs(claims, args, adapter, {"the input image": [args.input]})
    output, sidecar = claims.image_output(args.output)
    meta = _adapter_metadata(args, adapter)
    if adapter is None and args.checkpoint is None:
        raise InputError("segment needs an adapter (--adapter NAME or FILE): a base model's class head is "
                         "untrained, so its labels would mean nothing; train one with `hfsam finetune` "
                         "(`hfsam models list` shows the library's)")
    if args.classes is not None:
        from .classes import resolve_classes

        wanted = [c["name"] for c in resolve_classes(args.classes)]
        if meta is not None and wanted != [c["name"] for c in meta["classes"]]:
            raise InputError(f"adapter {adapter.name} segments {', '.join(c['name'] for c in meta['classes'])}; "
                             "--classes cannot rename or change them (fine-tune a new adapter instead)")
    image = read_image(args.input, warn=progress.warn)
    check_can_store(image, output)
    check_slices_are_images(image, args.axis, str(args.input))
    if meta is not None and "preset" not in (getattr(args, "explicit", None) or ()):
        looks = choose_preset(image)
        if looks != args.preset:
            progress.warn(f"this image looks like {looks.upper()} but the adapter was trained on {args.preset.upper()}; "
                          f"using the {args.preset} preset the adapter needs")
    with claims.hold() as writes:
        return _segment(args, progress, image, output, sidecar, library, writes)


def _segment(args, progress: Progress, image, output: Path, sidecar: Path, library, writes) -> int:
    from .loading import load_model
    from .segment import segment_image
    from .volume import data_files, write_image

    device, dtype = _device_and_dtype(args)
    lm = load_model(adapter=args.adapter, checkpoint=args.checkpoint, backbone=args.backbone,
                    img_size=args.img_size, rank=args.rank, fusion=args.fusion, classes=args.classes,
                    library=library, progress=progress)
    if not args.adapter and lm.base.get("sha256"):
        progress.warn("no adapter given: the class head is untrained, so the result is not meaningful; "
                      "fine-tune one with `hfsam finetune` or pass --adapter")
    labels, info = segment_image(image, lm.model, preset=args.preset, axis=args.axis, batch_size=args.batch_size,
                                 device=device, dtype=dtype, progress=progress,
                                 class_values=[c["value"] for c in lm.classes])
    progress.check_cancelled()  # a cancel that came after the last batch still means "write nothing"
    if info["labeled_voxels"] == 0:
        names = ", ".join(c["name"] for c in lm.classes)
        progress.warn(f"EVERY VOXEL CAME OUT AS BACKGROUND: none of the {len(lm.classes)} class(es) ({names}) was "
                      f"found in any of the {info['slices']} slices. Do not read this as 'not present': if the "
                      "structures are in the scan, this model does not fit it (another modality, body region or "
                      "slice axis?)")
    # One atomic step for both files; the label volume is renamed last, so once it exists
    # under its name its sidecar is complete too.
    writes.replacing(output, sidecar, *data_files(output))
    write_image(labels, output, overwrite=args.overwrite,
                sidecar={"output": output.name, "classes": lm.classes, "model": lm.describe(),
                         "input": str(args.input), "run": info})
    progress.log(f"wrote {output} ({info['slices']} slices, {info['device']}, {info['precision']}) and {sidecar.name}")
    progress.result(output=str(output), sidecar=str(sidecar), classes=lm.classes, **info)
    return 0


def cmd_finetune(args, progress: Progress) -> int:
    import SimpleITK as sitk

    from .classes import classes_for_labels
    from .outputs import Claims
    from .slices import check_slices_are_images, choose_training_slices, parse_slice_list
    from .volume import label_values, labels_onto_image, read_image, read_label_volumes, read_labels

    # Every check that needs no model comes first, before torch is even imported.
    if not args.output and not args.name:
        raise InputError("say where the adapter goes: -o FILE.safetensors and/or --name NAME (model library)")
    library = _library(args)
    adapter = _adapter_path(args, library)
    claims = Claims(overwrite=args.overwrite)
    _run_inputs(claims, args, adapter, {"the input image": [args.image], "a label file of this run": args.labels})
    output = claims.output(args.output, kind="adapter") if args.output else None
    entry = claims.library_entry(library, args.name) if args.name else None
    adapter_meta = _adapter_metadata(args, adapter)
    image = read_image(args.image, warn=progress.warn)
    warn = progress.warn
    labels = read_labels(args.labels[0], warn=warn) if len(args.labels) == 1 else read_label_volumes(args.labels, warn=warn)
    _warn_outside(progress, labels, image, "the labels", "the image",
                  "if the label map is shifted or from another scan, fix it; if the image is a crop of it, "
                  "this is expected")
    labels = labels_onto_image(labels, image)  # by physical position; refuses labels of another scan
    view = check_slices_are_images(image, args.axis, str(args.image))
    slices = parse_slice_list(args.slices, view.n_slices)
    source = args.labels[0] if len(args.labels) == 1 else "the label masks"
    classes, values, note = classes_for_labels(args.classes, label_values(labels), adapter=adapter_meta,
                                               source=str(source))
    if note:
        progress.warn(note)
    # Every non-zero label is a class now (classes_for_labels), so a slice with one carries a class.
    chosen = choose_training_slices(view, view.to_slices(sitk.GetArrayViewFromImage(labels)), slices)
    if args.holdout is not None and args.holdout >= len(chosen):
        raise InputError(f"--holdout {args.holdout} must leave at least one of the {len(chosen)} labeled slices "
                         "for training")
    with claims.hold() as writes:
        return _finetune(args, progress, image, labels, slices, classes, values, output, entry, library, writes)


def _finetune(args, progress: Progress, image, labels, slices, classes, values, output: Path | None,
              entry: Path | None, library, writes) -> int:
    import numpy as np
    import torch

    from . import __version__ as version
    from .adapters import save_adapter
    from .finetune import prepare_training_set, recipe_config, train
    from .loading import load_model

    if args.seed is not None:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
    device, dtype = _device_and_dtype(args)
    lm = load_model(adapter=args.adapter, checkpoint=args.checkpoint, backbone=args.backbone,
                    img_size=args.img_size, rank=args.rank, fusion=args.fusion,
                    classes=None if args.adapter else classes, library=library, progress=progress)
    model = lm.model.to(device)
    data = prepare_training_set(image, labels, num_classes=len(lm.classes), img_size=lm.spec.img_size,
                                slices=slices, axis=args.axis, preset=args.preset, device=device,
                                label_values=values)
    progress.log(f"training on {len(data.slices)} labeled slice(s): {', '.join(map(str, data.slices))}")
    cfg = recipe_config(lm.spec.backbone, steps=args.steps, minutes=args.minutes, cached_steps=args.cached_steps,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, holdout=args.holdout,
                        precision=dtype)
    report = train(model, data, cfg, progress)  # refuses a diverged model, also after the last step
    progress.check_cancelled()  # a cancel during the last step's bookkeeping still means "write nothing"

    metadata = {
        "name": args.name or (output.stem if output else "adapter"),
        **lm.spec.as_dict(),
        "base_checkpoint": lm.base,
        "classes": lm.classes,
        "intensity_preset": data.preset,
        "axis": args.axis,
        "training": {
            "image": str(args.image), "slices": report.slices, "heldout_slices": report.heldout_slices,
            "steps": report.steps, "cached_steps": report.cached_steps, "seed": args.seed,
            "batch_size": report.batch_size, "lr": args.lr,
            "minutes": args.minutes, "started_from": str(lm.adapter_path) if lm.adapter_path else None,
        },
        "metrics": {k: v for k, v in (("final_loss", report.final_loss), ("heldout_dice", report.heldout_dice),
                                      ("seconds", report.seconds)) if v is not None},
        "description": args.description,
        "hfsam_version": version,
    }
    metadata.pop("num_classes", None)
    tensors = model.trainable_state_dict()
    # Both files or neither: when the library entry fails after -o was written, Claims.hold takes -o back.
    writes.replacing(*(p for p in (output, entry) if p is not None))
    if output:
        save_adapter(output, tensors, metadata, overwrite=args.overwrite)
    if args.name:
        library.save_adapter(args.name, tensors, metadata, overwrite=args.overwrite)
    written = [str(p) for p in (output, entry) if p is not None]
    progress.log(f"trained {report.steps} steps in {report.seconds:.0f} s (loss {report.final_loss:.3f}"
                 + (f", held-out Dice {report.heldout_dice:.3f}" if report.heldout_dice is not None else "")
                 + f"); wrote {', '.join(written)}")
    progress.result(adapter=written[0], name=args.name, classes=lm.classes, **report.as_dict())
    return 0


def cmd_evaluate(args, progress: Progress) -> int:
    from .metrics import evaluate, format_table
    from .volume import label_values, read_labels, sidecar_path

    reference = read_labels(args.reference, warn=progress.warn)
    prediction = read_labels(args.prediction, warn=progress.warn)
    outside, total = _warn_outside(progress, reference, prediction, "the reference", "the prediction's grid",
                                   "the scores cover only the part of the reference the prediction covers")
    ref_values, pred_values = label_values(reference), label_values(prediction)
    if ref_values and pred_values and not set(ref_values) & set(pred_values):
        progress.warn(f"the reference (values {_few(ref_values)}) and the prediction (values {_few(pred_values)}) "
                      "share no label value: are they labelled alike? Every class scores 0")
    names = None
    if args.classes:
        from .classes import resolve_classes

        names = {c["value"]: c["name"] for c in resolve_classes(args.classes)}
    else:
        names = _sidecar_names(sidecar_path(args.prediction), Path(args.prediction).name, progress)
    result = evaluate(reference, prediction, names, progress=progress)
    result["reference_outside_prediction"] = {"voxels": outside, "of_labeled_voxels": total}
    if progress.mode != "json":  # in JSON mode stdout carries events only: the scores are the result event
        print(json.dumps(result, indent=2) if args.json else format_table(result))
    progress.result(**result)
    return 0


def _few(values: list[int]) -> str:
    return ", ".join(map(str, values[:5])) + (" ..." if len(values) > 5 else "")


def _sidecar_names(sidecar: Path, prediction: str, progress: Progress) -> dict[int, str] | None:
    """Class names from the prediction's sidecar, if it is this prediction's (its "output" field)."""
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text())
        owner = data.get("output")
        if owner is not None and str(owner).casefold() != prediction.casefold():
            progress.warn(f"ignoring {sidecar}: it is the sidecar of {owner}, not of {prediction}")
            return None
        return {int(c["value"]): str(c["name"]) for c in data["classes"]}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        progress.warn(f"ignoring unreadable sidecar {sidecar}")
        return None


def cmd_info(args, progress: Progress) -> int:
    import torch

    from .classes import resolve_classes
    from .model.hfsam import HFSAM, ModelSpec
    from .model.registry import get_backbone_info

    k = int(args.classes) if args.classes.isdigit() else len(resolve_classes(args.classes))
    spec = ModelSpec(args.backbone, args.img_size or get_backbone_info(args.backbone).default_img_size, k, args.rank,
                     args.fusion, pixel_norm=args.pixel_norm).resolved()
    with torch.device("meta"):  # counts without allocating vit_h's weights
        model = HFSAM(spec)
    tokens = spec.img_size // 16
    info = {
        **spec.as_dict(),
        "embedding_size": [tokens, tokens],
        "logits_size": [tokens * 4, tokens * 4],
        "outputs": k + 1,
        "parameters": model.parameter_counts(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        c = info["parameters"]
        print(f"HF-SAM {spec.backbone} at {spec.img_size} px, {k} classes + background, LoRA rank {spec.rank}, "
              f"fusion {spec.fusion}, low-level block(s) {list(spec.low_level_blocks)}, "
              f"pixel normalisation {spec.pixel_norm}")
        print(f"parameters: total {c['total']:,}  trainable {c['trainable']:,}  LoRA {c['lora']:,}  "
              f"frozen {c['frozen']:,}")
    return 0


def cmd_demo(args, progress: Progress) -> int:
    from .demo import run_demo

    return run_demo(args, progress)


def cmd_bench(args, progress: Progress) -> int:
    from .bench import run_bench

    return run_bench(args, progress)


# -- entry point -------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:  # a malformed command line: one line too, and a JSON event when asked for
        return _refuse(Progress(progress_mode(argv)), str(exc))
    progress = Progress(getattr(args, "progress", "auto") or "auto")
    progress.install_signal_handlers()
    keep_freed_memory()
    with warnings.catch_warnings():
        _warnings_as_progress(progress)
        return _run(args, progress)


def _warnings_as_progress(progress: Progress) -> None:
    """The engine's warnings (HFSAMWarning, from code that has no Progress to hand, such as dataset
    readers) become one ``warning:`` line and a JSON event, every time; other warnings are left alone."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, HFSAMWarning):
            progress.warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", HFSAMWarning)
    warnings.showwarning = show


def _run(args, progress: Progress) -> int:
    try:
        check_options(args)
        return int(args.func(args, progress) or 0)
    except InputError as exc:
        return _refuse(progress, str(exc))
    except (Cancelled, KeyboardInterrupt) as exc:
        # A Cancelled says what was kept (e.g. `train` keeps its finished checkpoints).
        message = str(exc) if isinstance(exc, Cancelled) and str(exc) else "cancelled; nothing was written"
        progress.error(message, exit_code=130)
        progress.log(f"hfsam: {message}")
        return 130
    except HFSAMError as exc:
        progress.error(str(exc), exit_code=exc.exit_code)
        progress.log(f"hfsam: error: {exc}")
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence reports and exits 1
        if is_out_of_memory(exc):  # even batch size 1 did not fit: say what to do, not where it happened
            message = ("out of memory; close other programs, use a smaller --batch-size or --img-size, "
                       "or run where there is more memory")
            progress.error(message, exit_code=1)
            progress.log(f"hfsam: error: {message}")
            return 1
        traceback.print_exc(file=sys.stderr)
        progress.error(f"{type(exc).__name__}: {exc}", exit_code=1)
        return 1


def _refuse(progress: Progress, text: str) -> int:
    """Bad input: exit code 2, one line on stderr and one JSON error event."""
    # One line, whatever a path or a library put in it: line breaks are shown, not obeyed.
    message = text.strip().replace("\r", "\\r").replace("\n", "\\n") or "bad input"
    progress.error(message, exit_code=2)
    progress.log(f"hfsam: error: {message}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
