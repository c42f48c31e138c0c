"""`hfsam`: the command-line front end. Thin: every command calls into the modules beside it.

Exit codes: 0 done, 2 bad input (one line on stderr, nothing written),
130 cancelled, 1 anything else. With ``--progress json`` stdout carries one JSON
event per line (DESIGN.md, "Progress protocol"); logs always go to stderr.
Heavy imports (torch, SAM) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import Cancelled, HFSAMError, InputError
from .malloc import keep_freed_memory
from .model.registry import FUSIONS, backbone_names, pretrained_backbones
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


# Options an adapter fixes: argparse dest -> (option, adapter metadata field).
ADAPTER_FIXES = {"backbone": ("--backbone", "backbone"), "img_size": ("--img-size", "img_size"),
                 "rank": ("--rank", "rank"), "fusion": ("--fusion", "fusion")}


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
    g.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"],
                   help="slice direction, in patient terms (whatever the voxel order)")
    g.add_argument("--preset", default="auto", choices=["auto", "ct", "mr"],
                   help="intensity preset; auto chooses from the data (DICOM modality, HU range)")
    g.add_argument("--progress", default="auto", choices=["auto", "json", "tty", "none"],
                   help="json: one event per line on stdout (for the Slicer module); tty: a bar on stderr")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _sub(subparsers, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_, description=help_, epilog="example:\n  " + example,
                                 formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    from .model.registry import PIXEL_NORMS

    parser = argparse.ArgumentParser(prog="hfsam", description=DESCRIPTION, formatter_class=_Formatter)
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
    p.add_argument("--steps", type=int, help="training steps (default 300 unless --minutes is given)")
    p.add_argument("--minutes", type=float, help="wall-clock budget instead of (or as well as) --steps")
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
    p.set_defaults(func=cmd_demo)

    from . import cli_models

    cli_models.add_parser(sub)

    from . import cli_dataset

    cli_dataset.add_parsers(sub)

    p = _sub(sub, "bench", "Benchmarks: machine ceiling, FLOPs, inference and fine-tuning speed, memory, "
                           "and few-shot Dice for N labeled slices. Writes Markdown and JSON.",
             "hfsam bench speed --checkpoint none --backbone vit_b --img-size 512 -o benchmarks/results\n"
             "  hfsam bench fewshot --checkpoint none --backbone tiny -o benchmarks/results")
    p.add_argument("which", choices=["speed", "fewshot"])
    p.add_argument("-o", "--output", default="benchmarks/results", help="folder for the result files")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--volume", help="volume for the whole-segment timing (default: the DICOM sample)")
    _add_model_args(p, adapter_help="(unused)")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="auto", choices=["auto", "json", "tty", "none"])
    p.set_defaults(func=cmd_bench)
    return parser


# -- helpers ---------------------------------------------------------------------
def check_output(path: str | Path, overwrite: bool) -> Path:
    """Fail before any computation if the output cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to replace it or choose another name")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"the output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"the output folder {parent} is not writable; choose another place")
    return path


def _library(args):
    from .library import ModelLibrary

    return ModelLibrary(getattr(args, "library", None))


def _adapter_metadata(args, library) -> dict | None:
    """The --adapter's validated metadata (None without one), read from its header only,
    so that a wrong adapter is refused before torch is even imported. Refuses model
    options the user typed that the adapter contradicts."""
    if not args.adapter:
        return None
    from .adapters import read_metadata

    path = library.resolve_adapter(args.adapter)
    meta = read_metadata(path)
    wrong = [f"{option} {getattr(args, dest)}" for dest, (option, field) in ADAPTER_FIXES.items()
             if dest in (getattr(args, "explicit", None) or ()) and getattr(args, dest) != meta[field]]
    if wrong:
        raise InputError(f"adapter {path.name} was trained for backbone {meta['backbone']}, img-size "
                         f"{meta['img_size']}, rank {meta['rank']}, fusion {meta['fusion']}, not {', '.join(wrong)}: "
                         "drop the option (an adapter fixes the model) or choose an adapter trained for it")
    return meta


def _claim(stack: contextlib.ExitStack, folder: Path, name: str, what: str = "output") -> None:
    """Lock ``folder/.NAME.lock`` for the rest of the run: a second process writing the
    same output or library entry is refused at once with a clear message, with or
    without --overwrite, instead of racing this one to the final rename."""
    from .library import entry_lock

    stack.enter_context(entry_lock(folder, name, what=what))


def _device_and_dtype(args):
    from .device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    return device, resolve_precision(getattr(args, "precision", "auto"), device)


# -- commands --------------------------------------------------------------------
def cmd_segment(args, progress: Progress) -> int:
    from .volume import read_image, sidecar_path

    # Every check that needs no model comes first, before torch is even imported.
    output = check_output(args.output, args.overwrite)
    sidecar = check_output(sidecar_path(output), args.overwrite)
    library = _library(args)
    _adapter_metadata(args, library)
    image = read_image(args.input)
    with contextlib.ExitStack() as claims:
        _claim(claims, output.parent, output.name)  # one lock covers the label volume and its sidecar
        return _segment(args, progress, image, output, sidecar, library)


def _segment(args, progress: Progress, image, output: Path, sidecar: Path, library) -> int:
    from .loading import load_model
    from .segment import segment_image
    from .volume import write_image

    device, dtype = _device_and_dtype(args)
    lm = load_model(adapter=args.adapter, checkpoint=args.checkpoint, backbone=args.backbone,
                    img_size=args.img_size, rank=args.rank, fusion=args.fusion, classes=args.classes,
                    library=library, progress=progress)
    if not args.adapter and lm.base.get("sha256"):
        progress.warn("no adapter given: the class head is untrained, so the result is not meaningful; "
                      "fine-tune one with `hfsam finetune` or pass --adapter")
    preset = args.preset
    trained = (lm.adapter_metadata or {}).get("intensity_preset")
    if preset == "auto" and trained:
        from .slices import choose_preset

        if choose_preset(image) != trained:
            progress.warn(f"this image looks like {choose_preset(image).upper()} but the adapter was trained "
                          f"on {trained.upper()}; using the {trained} preset (override with --preset)")
        preset = trained
    labels, info = segment_image(image, lm.model, preset=preset, axis=args.axis, batch_size=args.batch_size,
                                 device=device, dtype=dtype, progress=progress)
    progress.check_cancelled()  # a cancel that came after the last batch still means "write nothing"
    # One atomic step for both files; the label volume is renamed last, so once it exists
    # under its name its sidecar is complete too.
    write_image(labels, output, overwrite=args.overwrite,
                sidecar={"classes": lm.classes, "model": lm.describe(), "input": str(args.input), "run": info})
    progress.log(f"wrote {output} ({info['slices']} slices, {info['device']}, {info['precision']}) and {sidecar.name}")
    progress.result(output=str(output), sidecar=str(sidecar), classes=lm.classes, **info)
    return 0


def _restore(path: Path, old: bytes | None) -> None:
    """Put back what ``path`` held before this run (or remove it if it was new)."""
    from .atomic import atomic_write

    with contextlib.suppress(Exception):  # best effort: the original error is what the user must see
        if old is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, lambda fh: fh.write(old), overwrite=True)


def _class_list(spec, labels_max: int):
    from .classes import resolve_classes

    if spec:
        return resolve_classes(spec)
    return resolve_classes(",".join(f"label_{i}" for i in range(1, max(1, labels_max) + 1)))


def cmd_finetune(args, progress: Progress) -> int:
    import SimpleITK as sitk

    from .slices import SliceView, parse_slice_list
    from .volume import labels_onto_image, read_image, read_label_volumes, read_labels

    # Every check that needs no model comes first, before torch is even imported.
    if not args.output and not args.name:
        raise InputError("say where the adapter goes: -o FILE.safetensors and/or --name NAME (model library)")
    output = check_output(args.output, args.overwrite) if args.output else None
    library = _library(args)
    if args.name:
        from .library import validate_name

        validate_name(args.name)
        if not args.overwrite and args.name in {e["name"] for e in library.list_adapters()}:
            raise InputError(f"the library already has an adapter named {args.name!r}; pass --overwrite or "
                             "choose another name")
    adapter_meta = _adapter_metadata(args, library)
    image = read_image(args.image)
    labels = read_labels(args.labels[0]) if len(args.labels) == 1 else read_label_volumes(args.labels)
    labels = labels_onto_image(labels, image)  # by physical position; refuses labels of another scan
    view = SliceView.from_image(image, args.axis)
    slices = parse_slice_list(args.slices, view.n_slices)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(labels)
    top = int(stats.GetMaximum())
    if adapter_meta is not None:
        names = [c["name"] for c in adapter_meta["classes"]]
        if top > len(names):
            raise InputError(f"the labels hold value {top} but adapter {adapter_meta['name']!r} knows "
                             f"{len(names)} class(es) ({', '.join(names)}); continuing training keeps its "
                             f"classes: use label values 0..{len(names)} only, or fine-tune a new adapter")
        if args.classes:
            from .classes import resolve_classes

            if [c["name"] for c in resolve_classes(args.classes)] != names:
                raise InputError("--classes differs from the adapter's classes; continuing training keeps them: "
                                 + ", ".join(names))
    with contextlib.ExitStack() as claims:
        if output:
            _claim(claims, output.parent, output.name)
        if args.name:
            _claim(claims, library.ensure_folder(library.adapters_dir), args.name, what="library entry")
        return _finetune(args, progress, image, labels, slices, top, output, library)


def _finetune(args, progress: Progress, image, labels, slices, top: int, output: Path | None, library) -> int:
    import numpy as np
    import torch

    from . import __version__ as version
    from .adapters import save_adapter
    from .finetune import TrainConfig, prepare_training_set, train
    from .loading import load_model

    if args.seed is not None:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
    device, dtype = _device_and_dtype(args)
    lm = load_model(adapter=args.adapter, checkpoint=args.checkpoint, backbone=args.backbone,
                    img_size=args.img_size, rank=args.rank, fusion=args.fusion,
                    classes=None if args.adapter else _class_list(args.classes, top),
                    library=library, progress=progress)
    model = lm.model.to(device)
    data = prepare_training_set(image, labels, num_classes=len(lm.classes), img_size=lm.spec.img_size,
                                slices=slices, axis=args.axis, preset=args.preset, device=device)
    progress.log(f"training on {len(data.slices)} labeled slice(s): {', '.join(map(str, data.slices))}")
    steps = args.steps if args.steps is not None else (None if args.minutes else 300)
    cfg = TrainConfig(steps=steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      holdout=args.holdout, precision=dtype)
    report = train(model, data, cfg, progress)
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
            "steps": report.steps, "seed": args.seed, "batch_size": report.batch_size, "lr": args.lr,
            "minutes": args.minutes, "started_from": str(lm.adapter_path) if lm.adapter_path else None,
        },
        "metrics": {k: v for k, v in (("final_loss", report.final_loss), ("heldout_dice", report.heldout_dice),
                                      ("seconds", report.seconds)) if v is not None},
        "description": args.description,
        "hfsam_version": version,
    }
    metadata.pop("num_classes", None)
    tensors = model.trainable_state_dict()
    written = []
    old_output = output.read_bytes() if output and args.overwrite and output.is_file() else None
    try:
        if output:
            save_adapter(output, tensors, metadata, overwrite=args.overwrite)
            written.append(str(output))
        if args.name:
            path = library.save_adapter(args.name, tensors, metadata, overwrite=args.overwrite)
            written.append(str(path))
    except BaseException:
        if written:  # -o was written but the library entry failed: a failed run leaves nothing behind
            _restore(output, old_output)
        raise
    progress.log(f"trained {report.steps} steps in {report.seconds:.0f} s (loss {report.final_loss:.3f}"
                 + (f", held-out Dice {report.heldout_dice:.3f}" if report.heldout_dice is not None else "")
                 + f"); wrote {', '.join(written)}")
    progress.result(adapter=str(output) if output else written[-1], name=args.name, classes=lm.classes,
                    **report.as_dict())
    return 0


def cmd_evaluate(args, progress: Progress) -> int:
    from .metrics import evaluate, format_table
    from .volume import read_labels, sidecar_path

    reference = read_labels(args.reference)
    prediction = read_labels(args.prediction)
    names = None
    if args.classes:
        from .classes import resolve_classes

        names = {c["value"]: c["name"] for c in resolve_classes(args.classes)}
    else:
        sidecar = sidecar_path(args.prediction)
        if sidecar.is_file():
            try:
                names = {int(c["value"]): str(c["name"]) for c in json.loads(sidecar.read_text())["classes"]}
            except (ValueError, KeyError, TypeError):
                progress.warn(f"ignoring unreadable sidecar {sidecar}")
    result = evaluate(reference, prediction, names)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    progress.result(**result)
    return 0


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
    args = parser.parse_args(argv)
    progress = Progress(getattr(args, "progress", "auto") or "auto")
    progress.install_signal_handlers()
    keep_freed_memory()
    try:
        return int(args.func(args, progress) or 0)
    except InputError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "bad input"
        progress.error(message, exit_code=2)
        progress.log(f"hfsam: error: {message}")
        return 2
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
        if _out_of_memory(exc):  # even batch size 1 did not fit: say what to do, not where it happened
            message = ("out of memory even at batch size 1; close other programs using the GPU, "
                       "use a smaller --img-size, or run on the CPU (--device cpu)")
            progress.error(message, exit_code=1)
            progress.log(f"hfsam: error: {message}")
            return 1
        traceback.print_exc(file=sys.stderr)
        progress.error(f"{type(exc).__name__}: {exc}", exit_code=1)
        return 1


def _out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA) or a host MemoryError, recognised without importing torch."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


if __name__ == "__main__":
    raise SystemExit(main())
