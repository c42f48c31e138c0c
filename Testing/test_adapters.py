"""Adapter files: bit-exact round trip, strict metadata, compatibility, refusing non-adapters."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from HFSAMCore.errors import InputError
from HFSAMCore.io import atomic
from HFSAMCore.store.adapter_metadata import check_compatible, validate_metadata
from HFSAMCore.store.adapters import load_adapter, read_metadata, save_adapter

SHA_B = "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
SHA_L = "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"


def good_meta(**changes) -> dict:
    meta = {
        "name": "liver5",
        "backbone": "vit_b",
        "img_size": 512,
        "rank": 5,
        "fusion": "two_step",
        "base_checkpoint": {"name": "sam_vit_b_01ec64.pth", "sha256": SHA_B},
        "classes": [
            {
                "value": 1,
                "name": "liver",
                "color": [221, 130, 101],
                "terminology": {
                    "category": ["SCT", "123037004", "Anatomical Structure"],
                    "type": ["SCT", "10200004", "Liver"],
                },
            },
            {"value": 5, "name": "spleen", "color": [157, 108, 162]},
        ],
        "intensity_preset": "ct",
        "training": {
            "image": "ct.nii.gz",
            "slices": [3, 7, 12],
            "steps": 200,
            "seed": 0,
            "batch_size": 4,
            "lr": 0.0025,
            "minutes": None,
            "started_from": None,
        },
        "metrics": {"heldout_dice": 0.81, "per_class": {"liver": {"dice": 0.9, "hd95_mm": float("inf")}}},
        "description": "few-shot liver",
    }
    meta.update(changes)
    return meta


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 4, generator=g)
    return {
        "encoder.blocks.0.attn.qkv.lora_a_q": torch.randn(5, 768, generator=g),
        "decoder.mask_tokens.weight": torch.randn(9, 256, generator=g).to(torch.float16),
        "awffm.ca.w": torch.randn(32, 256, generator=g).to(torch.bfloat16),
        "step": torch.tensor([3, -1, 7], dtype=torch.int64),
        "transposed": base.t(),  # not contiguous
        "view_of_same_storage": base[:2],  # shares storage with "transposed"
    }


# -- round trip ---------------------------------------------------------------
def test_round_trip_is_bit_exact(tmp_path):
    original = tensors()
    path = save_adapter(tmp_path / "a.safetensors", original, good_meta())
    loaded, meta = load_adapter(path)
    assert set(loaded) == set(original)
    for key, value in original.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    # The metadata comes back complete: what was given, plus the defaults.
    assert meta["format"] == "hfsam-adapter" and meta["format_version"] == 1
    assert meta["low_level_blocks"] == [2]  # vit_b's first global-attention block
    assert meta["axis"] == "axial" and meta["extra"] == {}
    assert meta["classes"][1] == {"value": 5, "name": "spleen", "color": [157, 108, 162], "terminology": None}
    assert meta["classes"][0]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert meta["training"]["slices"] == [3, 7, 12] and meta["training"]["lr"] == 0.0025
    assert meta["metrics"]["per_class"]["liver"] == {"dice": 0.9, "hd95_mm": None}  # inf is not JSON
    assert meta["created"].endswith("Z")
    assert read_metadata(path) == meta
    # Nothing but the adapter in the folder: the temp file was renamed, not copied.
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_no_overwrite_unless_asked(tmp_path):
    path = save_adapter(tmp_path / "a.safetensors", tensors(0), good_meta())
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        save_adapter(path, tensors(1), good_meta())
    assert path.read_bytes() == before
    save_adapter(path, tensors(1), good_meta(name="v2"), overwrite=True)
    loaded, meta = load_adapter(path)
    assert meta["name"] == "v2" and torch.equal(loaded["step"], tensors(1)["step"])
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_interrupted_write_leaves_nothing(tmp_path):
    dest = tmp_path / "x.bin"

    def write(fh):
        fh.write(b"half")
        raise KeyboardInterrupt  # e.g. a second Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(dest, write)
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        save_adapter(tmp_path / "nope" / "a.safetensors", tensors(), good_meta())
    with pytest.raises(InputError, match=r"\.safetensors"):
        save_adapter(tmp_path / "a.pt", tensors(), good_meta())


# -- metadata validation ------------------------------------------------------
def _drop(key):
    def change(meta):
        del meta[key]

    return change


def _set(path, value):
    def change(meta):
        target = meta
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


BAD_METADATA = [
    ("name", _drop("name")),
    ("name", _set(["name"], "")),
    ("name", _set(["name"], "x" * 129)),
    ("name", _set(["name"], "bad\nname")),
    ("backbone", _set(["backbone"], "vit_x")),
    ("backbone", _drop("backbone")),
    ("img_size", _set(["img_size"], 500)),
    ("img_size", _set(["img_size"], 4096)),
    ("img_size", _set(["img_size"], "512")),
    ("img_size", _set(["img_size"], True)),
    ("rank", _set(["rank"], -1)),
    ("rank", _set(["rank"], 257)),
    ("rank", _set(["rank"], 5.0)),
    ("fusion", _set(["fusion"], "three_step")),
    ("low_level_blocks", _set(["low_level_blocks"], [12])),  # vit_b has blocks 0..11
    ("low_level_blocks", _set(["low_level_blocks"], [2, 2])),
    ("low_level_blocks", _set(["low_level_blocks"], "2")),
    ("low_level_blocks", _set(["backbone"], "tiny")),  # no default for the tiny configuration
    ("base_checkpoint.sha256", _set(["base_checkpoint", "sha256"], "abc")),
    ("base_checkpoint.name", _set(["base_checkpoint", "name"], "")),
    ("base_checkpoint.url", _set(["base_checkpoint", "url"], "http://x")),
    ("classes", _set(["classes"], [])),
    ("classes", _set(["classes"], [{"value": v, "name": f"c{v}", "color": [0, 0, 0]} for v in range(1, 257)])),
    ("classes", _drop("classes")),
    ("classes[1].value", _set(["classes", 1, "value"], 1)),
    ("classes[1].value", _set(["classes", 1, "value"], 0)),
    ("classes[1].value", _set(["classes", 1, "value"], 256)),
    ("classes[1].name", _set(["classes", 1, "name"], "liver")),
    ("classes[1].name", _set(["classes", 1, "name"], "  ")),
    ("classes[1].name", _set(["classes", 1, "name"], "s" * 129)),
    ("classes[1].name", _set(["classes", 1, "name"], "spl\x00een")),
    ("classes[1].color", _set(["classes", 1, "color"], [1, 2])),
    ("classes[1].color", _set(["classes", 1, "color"], [1, 2, 256])),
    ("classes[1].color", _set(["classes", 1, "color"], [1, 2, -1])),
    ("classes[1].color", _set(["classes", 1, "color"], "red")),
    ("classes[1].terminology", _set(["classes", 1, "terminology"], "liver")),
    ("classes[1].colour", _set(["classes", 1, "colour"], [1, 2, 3])),
    ("intensity_preset", _set(["intensity_preset"], "pet")),
    ("axis", _set(["axis"], "oblique")),
    ("training.slices", _set(["training", "slices"], [1, -2])),
    ("training.steps", _set(["training", "steps"], "many")),
    ("training.lr", _set(["training", "lr"], float("nan"))),
    ("training.batch_size", _set(["training", "batch_size"], 0)),
    ("training.epochs", _set(["training", "epochs"], 3)),
    ("training.heldout_slices", _set(["training", "heldout_slices"], "4")),
    ("base_checkpoint.seed", _set(["base_checkpoint", "seed"], "zero")),
    ("training", _set(["training"], [1, 2])),
    ("metrics", _set(["metrics"], [0.8])),
    ("metrics", _set(["metrics"], {"a": object()})),
    ("format", _set(["format"], "other-format")),
    ("format_version", _set(["format_version"], 0)),
    ("created", _set(["created"], "yesterday")),
    ("description", _set(["description"], 42)),
    ("intesity_preset", _set(["intesity_preset"], "mr")),  # a typo must not silently take the default
]


@pytest.mark.parametrize("field,change", BAD_METADATA, ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD_METADATA)])
def test_bad_metadata_is_refused_naming_the_field(tmp_path, field, change):
    meta = copy.deepcopy(good_meta())
    change(meta)
    dest = tmp_path / "bad.safetensors"
    with pytest.raises(InputError) as info:
        save_adapter(dest, tensors(), meta)
    message = str(info.value)
    assert f"'{field}'" in message and str(dest) in message
    assert "\n" not in message
    assert not dest.exists()


def _write_raw(path: Path, metadata: dict[str, str] | None) -> Path:
    path.write_bytes(st_save({"w": torch.ones(2)}, metadata=metadata))
    return path


@pytest.mark.parametrize("field,change", BAD_METADATA[:12], ids=[f for f, _ in BAD_METADATA[:12]])
def test_bad_metadata_in_a_file_is_refused_on_load(tmp_path, field, change):
    meta = copy.deepcopy(good_meta())
    meta["metrics"] = {}
    change(meta)
    path = _write_raw(tmp_path / "bad.safetensors", {"hfsam": json.dumps(meta)})
    for reader in (read_metadata, load_adapter):
        with pytest.raises(InputError) as info:
            reader(path)
        assert f"'{field}'" in str(info.value) and str(path) in str(info.value)


def test_metadata_problems_in_the_header(tmp_path):
    cases = {
        "none.safetensors": (None, "no 'hfsam' metadata"),
        "other.safetensors": ({"format": "pt"}, "no 'hfsam' metadata"),
        "notjson.safetensors": ({"hfsam": "{not json"}, "not JSON"),
        "list.safetensors": ({"hfsam": "[1, 2]"}, "JSON object"),
        "huge.safetensors": ({"hfsam": json.dumps({"description": "x" * (1 << 20)})}, "1 MiB"),
        "newer.safetensors": ({"hfsam": json.dumps(good_meta(format_version=2, metrics={}))}, "newer HF-SAM"),
        # a newer format with a field this reader lacks: the version is what to tell, not the field
        "newer_field.safetensors": (
            {"hfsam": json.dumps(good_meta(format_version=2, gaze={}))},
            r"written by a newer HF-SAM \(adapter format_version 2",
        ),
        # a field added without a new format_version (as training.max_grad_norm was): what to do
        "new_field.safetensors": (
            {"hfsam": json.dumps(good_meta(training={**good_meta()["training"], "ema": 0.9}))},
            r"'training.ema' is not a known field of adapter format_version 1 "
            r"\(written by a newer HF-SAM\? update it\)",
        ),
    }
    for name, (metadata, expected) in cases.items():
        path = _write_raw(tmp_path / name, metadata)
        with pytest.raises(InputError, match=expected):
            load_adapter(path)


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "name",
                        "backbone",
                        "img_size",
                        "rank",
                        "fusion",
                        "classes",
                        "value",
                        "color",
                        "training",
                        "metrics",
                        "base_checkpoint",
                        "low_level_blocks",
                        "x",
                    ]
                ),
                children,
                max_size=6,
            )
        ),
        max_leaves=20,
    )
)
def test_validation_only_ever_raises_input_error(value):
    try:
        validate_metadata(value, source="fuzz")
    except InputError:
        pass


# -- compatibility ------------------------------------------------------------
def test_check_compatible_lists_every_mismatch():
    meta = validate_metadata(good_meta(low_level_blocks=[2, 5]))
    model = {
        "backbone": "vit_b",
        "img_size": 512,
        "rank": 5,
        "fusion": "two_step",
        "low_level_blocks": [2, 5],
        "base_checkpoint": {"name": "sam_vit_b_01ec64.pth", "sha256": SHA_B},
    }
    assert check_compatible(meta, model) is None
    assert check_compatible(meta, {"backbone": "vit_b"}) is None  # only given fields are compared
    other = {
        "backbone": "vit_l",
        "img_size": 224,
        "rank": 8,
        "fusion": "released",
        "low_level_blocks": [5],
        "base_checkpoint": {"name": "sam_vit_l_0b3195.pth", "sha256": SHA_L},
    }
    with pytest.raises(InputError) as info:
        check_compatible(meta, other)
    message = str(info.value)
    assert message.startswith("adapter 'liver5' does not match: backbone vit_b (model vit_l), ")
    for part in (
        "img_size 512 (model 224)",
        "rank 5 (model 8)",
        "fusion two_step (model released)",
        "low_level_blocks [2, 5] (model [5])",
        "base checkpoint sam_vit_b_01ec64.pth",
    ):
        assert part in message
    assert message.count("(model") == 6


def test_what_the_training_command_writes_is_accepted(tmp_path):
    """The shape `hfsam finetune` writes: a random test base with its seed, held-out slices, no description."""
    meta = good_meta(
        backbone="tiny",
        img_size=64,
        rank=0,
        low_level_blocks=[1],
        description=None,
        base_checkpoint={"name": "random-init", "sha256": None, "seed": 1234},
    )
    meta["training"]["heldout_slices"] = [20]
    meta["training"]["low_level_dropout"] = 0.5
    meta["training"]["max_grad_norm"] = 1.0
    path = save_adapter(tmp_path / "t.safetensors", tensors(), meta)
    loaded = read_metadata(path)
    assert loaded["training"]["low_level_dropout"] == 0.5 and loaded["training"]["max_grad_norm"] == 1.0
    assert (
        read_metadata(save_adapter(tmp_path / "old.safetensors", tensors(), good_meta()))["training"][
            "low_level_dropout"
        ]
        is None
    )  # an adapter from before it existed
    meta["training"]["low_level_dropout"] = -0.0  # `--low-level-dropout -0`
    zero = read_metadata(save_adapter(tmp_path / "zero.safetensors", tensors(), meta))
    stored = zero["training"]["low_level_dropout"]
    assert stored == 0.0 and math.copysign(1, stored) == 1
    for bad in (1.0, -0.1, float("nan"), "0.5", True):
        meta["training"]["low_level_dropout"] = bad
        with pytest.raises(InputError, match="training.low_level_dropout"):
            save_adapter(tmp_path / "bad.safetensors", tensors(), meta)
    meta["training"]["low_level_dropout"] = 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        meta["training"]["max_grad_norm"] = bad
        with pytest.raises(InputError, match="training.max_grad_norm"):
            save_adapter(tmp_path / "bad.safetensors", tensors(), meta)
    assert loaded["base_checkpoint"] == {"name": "random-init", "sha256": None, "seed": 1234}
    assert loaded["training"]["heldout_slices"] == [20] and loaded["description"] == ""
    assert loaded["rank"] == 0 and loaded["low_level_blocks"] == [1]
    # A random base equals null and another random base of the same seed; not one of another seed.
    check_compatible(loaded, {"base_checkpoint": {"name": "random-init", "sha256": None, "seed": 1234}})
    check_compatible(loaded, {"base_checkpoint": None})
    with pytest.raises(InputError, match=r"random init, seed 1234\) \(model none \(random init, seed 7\)\)"):
        check_compatible(loaded, {"base_checkpoint": {"name": "random-init", "seed": 7}})
    with pytest.raises(InputError, match="base checkpoint none"):
        check_compatible(loaded, {"base_checkpoint": {"name": "sam_vit_b_01ec64.pth", "sha256": SHA_B}})


def test_check_compatible_base_checkpoint_rules():
    meta = validate_metadata(good_meta())
    # Same file under another name: the hash decides.
    check_compatible(meta, {"base_checkpoint": {"name": "renamed.pth", "sha256": SHA_B}})
    check_compatible(meta, {"base_checkpoint": SHA_B})
    # Hash unknown on one side: not compared.
    check_compatible(meta, {"base_checkpoint": {"name": "x.pth", "sha256": None}})
    with pytest.raises(InputError, match=r"base checkpoint sam_vit_b_01ec64\.pth .* \(model none \(random init\)\)"):
        check_compatible(meta, {"base_checkpoint": None})
    random_init = validate_metadata(good_meta(base_checkpoint=None))
    check_compatible(random_init, {"base_checkpoint": None})
    with pytest.raises(InputError, match="none \\(random init\\)"):
        check_compatible(random_init, {"base_checkpoint": SHA_B})


# -- files that are not adapters ----------------------------------------------
def test_truncated_text_empty_and_missing_files(tmp_path):
    good = save_adapter(tmp_path / "good.safetensors", tensors(), good_meta())
    data = good.read_bytes()
    files = {
        "truncated.safetensors": data[: len(data) - 100],
        "header_only.safetensors": data[:40],
        "text.safetensors": b"this is a text file, not an adapter\n" * 10,
        "empty.safetensors": b"",
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for reader in (read_metadata, load_adapter):
            with pytest.raises(InputError, match="not a readable HF-SAM adapter") as info:
                reader(path)
            assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="not a file"):
        load_adapter(tmp_path)


class _Bomb:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_bomb_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    bomb = {"state_dict": {"w": torch.ones(2)}, "payload": _Bomb(marker)}
    # The bomb is live: plain unpickling of the same payload does run code.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Bomb(probe)))
    assert probe.exists()
    for name in ("bomb.pth", "bomb.safetensors"):
        path = tmp_path / name
        torch.save(bomb, path)  # a zip of pickles, like any .pth
        with pytest.raises(InputError, match="not a readable HF-SAM adapter"):
            load_adapter(path)
        with pytest.raises(InputError):
            read_metadata(path)
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(pickle.dumps(bomb, protocol=2))  # an old-style raw pickle
    with pytest.raises(InputError):
        load_adapter(legacy)
    assert not marker.exists()


def test_reading_metadata_does_not_import_torch(tmp_path, python_exe, repo_root):
    path = save_adapter(tmp_path / "a.safetensors", tensors(), good_meta())
    code = (
        "import sys, HFSAMCore.store.adapters as a, HFSAMCore.store.library; m = a.read_metadata(sys.argv[1]); "
        "print(m['name'], 'torch' in sys.modules)"
    )
    out = subprocess.run([python_exe, "-c", code, str(path)], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["liver5", "False"]


def test_a_base_checkpoint_given_as_adapter_is_named_for_what_it_is(tmp_path):
    """The library's lite_medsam.pth passed to --adapter: say it is a checkpoint and where it goes."""
    path = tmp_path / "lite_medsam.pth"
    torch.save({"image_encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(InputError, match="not a readable HF-SAM adapter but a PyTorch checkpoint") as info:
        read_metadata(path)
    assert "hfsam models import-checkpoint" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["top", "training", "base_checkpoint"])
def test_an_unknown_field_with_a_control_character_is_named_on_one_line(where):
    """The name of an unknown field comes from the file; a newline in it split the error in two (found
    by test_robustness's fuzzing of the adapter reader)."""
    meta, key = good_meta(), "bad\nname\x1b"
    if where == "top":
        meta[key] = None
    else:
        meta[where] = {**(meta[where] or {}), key: None}
    with pytest.raises(InputError) as err:
        validate_metadata(meta, source="a.safetensors")
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message
    prefix = "" if where == "top" else f"{where}."
    assert f"'{prefix}bad\\nname\\x1b' is not a known field" in message
