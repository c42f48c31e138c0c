"""The HF-SAM model: shapes, LoRA, AWFFM, freezing, and SAM checkpoint loading."""

import json
import pickle

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from HFSAMCore.errors import InputError
from HFSAMCore.model.awffm import AWFFM
from HFSAMCore.model.hfsam import HFSAM, ModelSpec, build_hfsam
from HFSAMCore.model.sam_vit import load_sam_weights, read_sam_state_dict


def tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return build_hfsam(ModelSpec(**{"backbone": "tiny", "img_size": 224, "num_classes": 3, "rank": 4, **kw}))


@pytest.mark.parametrize("img_size,fusion", [(224, "two_step"), (224, "released"), (512, "two_step")])
def test_output_shapes(img_size, fusion):
    model = tiny(img_size=img_size, fusion=fusion, num_classes=8).eval()
    x = torch.rand(2, 1, img_size, img_size)
    with torch.no_grad():
        logits = model(x)
        full = model.predict(x)
        resized = model.predict(x, out_size=(101, 122))
    assert logits.shape == (2, 9, img_size // 4, img_size // 4)
    assert full.shape == (2, 9, img_size, img_size)
    assert resized.shape == (2, 9, 101, 122)


def test_vit_b_forward_shape_at_224():
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("vit_b", 224, 8, 5)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 9, 56, 56)


@pytest.mark.parametrize("rank", [1, 5, 8])
def test_lora_parameter_count_vit_b(rank):
    with torch.device("meta"):
        model = HFSAM(ModelSpec("vit_b", 512, 8, rank))
    assert model.parameter_counts()["lora"] == 12 * 2 * 1536 * rank
    if rank == 5:
        assert model.parameter_counts()["lora"] == 184_320


def test_lora_counts_other_backbones():
    for name, depth, dim in (("vit_l", 24, 1024), ("vit_h", 32, 1280)):
        with torch.device("meta"):
            model = HFSAM(ModelSpec(name, 512, 8, 5))
        assert model.parameter_counts()["lora"] == depth * 2 * 2 * dim * 5


def _copy_base(src: HFSAM, dst: HFSAM) -> None:
    theirs = src.state_dict()
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            v.copy_(theirs[k])


def test_fresh_lora_changes_nothing_and_trained_lora_does():
    with_lora = tiny(rank=4).eval()
    without = tiny(rank=0).eval()
    _copy_base(with_lora, without)  # every key of the rank-0 model exists in the LoRA model
    x = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        a, b = with_lora(x), without(x)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # The test can fail: a non-zero B changes the output.
    with torch.no_grad():
        with_lora.image_encoder.blocks[0].attn.qkv.lora_B_q.weight.fill_(0.05)
        assert (with_lora(x) - b).abs().max() > 1e-4


def test_frozen_parameters_get_no_gradient():
    model = tiny().train()
    out = model(torch.rand(2, 1, 224, 224))
    # B of LoRA is zero, so A's gradient is zero on the first step; B's is not.
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if HFSAM.is_trainable_name(name):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["image_encoder.blocks.0.attn.qkv.lora_B_q.weight"].abs().sum() > 0
    assert grads["mask_decoder.awffm_1.fuse.weight"].abs().sum() > 0
    assert grads["low_level_proj.0.weight"].abs().sum() > 0
    assert "image_encoder.blocks.0.attn.qkv.weight" not in grads
    assert "prompt_encoder.no_mask_embed.weight" in grads


def test_trainable_set_is_what_design_says():
    names = tiny().trainable_state_dict().keys()
    assert any(n.startswith("prompt_encoder.no_mask_embed") for n in names)
    assert any(n.startswith("mask_decoder.transformer.") for n in names)
    assert not any(n.startswith("image_encoder.") and ".lora_" not in n for n in names)
    assert not any(n.startswith("prompt_encoder.point_embeddings") for n in names)


def test_awffm_matches_hand_computation():
    torch.manual_seed(1)
    m = AWFFM(dim=8, reduction=4).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    g = torch.randn(1, 8, 3, 4)
    low = torch.randn(1, 8, 3, 4)
    with torch.no_grad():
        got = m(g, low).numpy()

    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    G, L = g.numpy()[0], low.numpy()[0]
    Wf, bf = m.fuse.weight.detach().numpy()[:, :, 0, 0], m.fuse.bias.detach().numpy()
    X = np.einsum("oc,chw->ohw", Wf, np.concatenate([G, L])) + bf[:, None, None]
    stats = np.stack([X.mean(0), X.max(0)])  # [2,h,w]
    Ws = m.spatial.weight.detach().numpy()[0]  # [2,3,3]
    padded = np.pad(stats, ((0, 0), (1, 1), (1, 1)))
    S = np.zeros((3, 4))
    for i in range(3):
        for j in range(4):
            S[i, j] = (padded[:, i : i + 3, j : j + 3] * Ws).sum()
    Gp = G * sig(S)
    W1 = m.channel_mlp[0].weight.detach().numpy()[:, :, 0, 0]
    W2 = m.channel_mlp[2].weight.detach().numpy()[:, :, 0, 0]
    M = lambda v: W2 @ np.maximum(W1 @ v, 0)  # noqa: E731
    Ca = sig(M(Gp.mean((1, 2))) + M(Gp.max((1, 2))))
    want = Gp + L * Ca[:, None, None]
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, -1])
def test_awffm_amax_has_torchs_gradient_with_ties(dtype, dim):
    """awffm.amax (a cheaper backward) against torch.amax: the same values and bit-identical gradients,
    also where many values tie (an AWFFM started near identity ties every channel; max() would not split
    the gradient among them, and the test can tell)."""
    from HFSAMCore.model.awffm import amax

    torch.manual_seed(2)
    x = torch.randn(2, 301, 16).to(dtype)
    x[0] = 0.5  # every position ties: 300 in bf16 is 300, 301 is not (torch rounds the count; so must we)
    x[1, :, :4] = x[1].amax(dim=-1, keepdim=True)  # four channels tie in each row
    g = torch.randn(2, 16 if dim == 1 else 301).to(dtype)
    grads = []
    for f in (lambda t: t.amax(dim), lambda t: amax(t, dim), lambda t: t.max(dim).values):
        t = x.clone().requires_grad_()
        y = f(t)
        y.backward(g)
        grads.append((y.detach(), t.grad))
    (want_y, want_g), (got_y, got_g), (_, max_g) = grads
    assert torch.equal(got_y, want_y) and torch.equal(got_g, want_g)
    assert not torch.equal(max_g, want_g)


def test_fusion_modes_have_the_right_modules():
    two = tiny(fusion="two_step").mask_decoder
    rel = tiny(fusion="released").mask_decoder
    assert hasattr(two, "awffm_1") and hasattr(two, "awffm_2") and not hasattr(two, "awffm")
    assert hasattr(rel, "awffm") and not hasattr(rel, "awffm_1")
    assert hasattr(rel, "hf_token") and not hasattr(two, "hf_token")


# -- the authors' released network, from its equations ------------------------------
def _attention(m, q, k, v):
    """SAM's Attention as an equation: per head softmax(q Wq (k Wk)^T / sqrt(d)) v Wv, then Wo."""
    heads = m.num_heads
    q, k, v = (F.linear(t, lin.weight, lin.bias) for t, lin in ((q, m.q_proj), (k, m.k_proj), (v, m.v_proj)))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)


def _norm(m, x):
    return F.layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)


def _awffm(m, g, low):  # docs/design.md's AWFFM equations (= the authors' CIF_block)
    x = F.conv2d(torch.cat((g, low), 1), m.fuse.weight, m.fuse.bias)
    g = g * torch.sigmoid(
        F.conv2d(torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1), m.spatial.weight, padding=1)
    )
    mlp = lambda t: F.conv2d(F.relu(F.conv2d(t, m.channel_mlp[0].weight)), m.channel_mlp[2].weight)  # noqa: E731
    return g + low * torch.sigmoid(mlp(g.mean((2, 3), keepdim=True)) + mlp(g.amax((2, 3), keepdim=True)))


def _authors_decoder(dec, g, low, pe, dense, *, sam_order=False, hf_token=True):
    """HF-SAM's released MaskDecoder_512 as equations: tokens [iou, mask_0..K, hf]; src = G + dense (the
    first fusion is overwritten); H-SAM's blocks, cross-attention first (the first block's self-attention
    without PE or residual); SAM's final token attention; ONE fusion after the transformer; SAM's upscaling
    and one hypernetwork MLP per mask token. ``sam_order``/``hf_token``: the two things that differ from SAM,
    switched back, to show that the test can tell."""
    b, c, h, w = g.shape
    parts = [dec.iou_token.weight, dec.mask_tokens.weight] + ([dec.hf_token.weight] if hf_token else [])
    tokens = torch.cat(parts).unsqueeze(0).expand(b, -1, -1)
    keys, kpe = (g + dense).flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2)
    q, qpe = tokens, tokens
    for i, blk in enumerate(dec.transformer.layers):

        def self_attention(q, i=i, blk=blk):  # defaults bind this iteration's block explicitly
            if i == 0:
                return _norm(blk.norm1, _attention(blk.self_attn, q, q, q))
            return _norm(blk.norm1, q + _attention(blk.self_attn, q + qpe, q + qpe, q))

        if sam_order:
            q = self_attention(q)
        q = _norm(blk.norm2, q + _attention(blk.cross_attn_token_to_image, q + qpe, keys + kpe, keys))
        if not sam_order:
            q = self_attention(q)
        q = _norm(blk.norm3, q + blk.mlp.lin2(F.relu(blk.mlp.lin1(q))))
        keys = _norm(blk.norm4, keys + _attention(blk.cross_attn_image_to_token, keys + kpe, q + qpe, q))
    t = dec.transformer
    q = _norm(t.norm_final_attn, q + _attention(t.final_attn_token_to_image, q + qpe, keys + kpe, keys))
    src = _awffm(dec.awffm, keys.transpose(1, 2).reshape(b, c, h, w), low)
    up = dec.output_upscaling(src)
    hyper = torch.stack([mlp(q[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    return (hyper @ up.flatten(2)).reshape(b, -1, *up.shape[-2:])


def test_released_decoder_is_the_authors_network():
    from HFSAMCore.model.decoder import HFSAMDecoder

    torch.manual_seed(3)
    dec = HFSAMDecoder(num_classes=3, transformer_dim=32, depth=2, mlp_dim=48, num_heads=2, fusion="released")
    with torch.no_grad():
        for p in dec.parameters():  # LayerNorms start at 1/0 and B of nothing: move every weight off its init
            p.add_(0.2 * torch.randn_like(p))
    g, low = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    pe, dense = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 1, 1)
    with torch.no_grad():
        got = dec(g, low, pe, dense)
        want = _authors_decoder(dec, g, low, pe, dense)
        sam_order = _authors_decoder(dec, g, low, pe, dense, sam_order=True)
        no_hf = _authors_decoder(dec, g, low, pe, dense, hf_token=False)
    assert got.shape == (2, 4, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - sam_order).abs().max() > 1e-2 and (got - no_hf).abs().max() > 1e-2  # both matter


def test_released_trainable_count_is_the_authors(capsys):
    """`hfsam info --fusion released` (vit_b, 512 px, 8 classes, rank 5: the authors' train.py defaults) reports
    the 5,155,474 parameters that the authors' model trains (docs/reproduce.md: counted on their code)."""
    from HFSAMCore.cli.app import build_parser
    from HFSAMCore.runtime.progress import Progress

    args = build_parser().parse_args(["info", "--fusion", "released", "--pixel-norm", "unit", "--json"])
    args.func(args, Progress("none"))
    out = json.loads(capsys.readouterr().out)
    assert out["pixel_norm"] == "unit" and out["fusion"] == "released"
    assert out["parameters"]["trainable"] == 5_155_474 and out["parameters"]["lora"] == 184_320
    # the frozen encoder is SAM's ViT-B at 512 px (87,278,848, as theirs) plus the unused prompt embeddings
    assert out["parameters"]["frozen"] == 87_278_848 + 4 * 256 + 256 + 4_684
    # the paper's two-step decoder: a second AWFFM (147,730), no hf_token (256)
    with torch.device("meta"):
        two = HFSAM(ModelSpec("vit_b", 512, 8, 5, "two_step"))
    assert two.parameter_counts()["trainable"] == 5_155_474 - 256 + 147_730


# -- SAM checkpoints --------------------------------------------------------------
def sam_style_checkpoint(path, *, img_size=1024, extra=None, drop=None):
    """A tiny checkpoint with the official SAM key layout at SAM's own 1024 px."""
    torch.manual_seed(7)
    model = build_hfsam(ModelSpec("tiny", img_size, 3, 0))
    state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith(
            (
                "low_level_proj.",
                "mask_decoder.awffm",
                "mask_decoder.mask_tokens",
                "mask_decoder.output_hypernetworks_mlps",
            )
        )
    }
    # SAM's own 3+1 mask outputs and IoU head: present in real checkpoints, not used by HF-SAM.
    state["mask_decoder.mask_tokens.weight"] = torch.randn(4, 64)
    state["mask_decoder.iou_prediction_head.layers.0.weight"] = torch.randn(64, 64)
    state.update(extra or {})
    for k in drop or ():
        state.pop(k)
    torch.save(state, path)
    return state


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    state = sam_style_checkpoint(tmp_path / "sam_tiny.pth")
    model = build_hfsam(ModelSpec("tiny", 1024, 3, 4))
    report = load_sam_weights(model, read_sam_state_dict(tmp_path / "sam_tiny.pth"), model.info, 1024)
    assert report["loaded"] == len(state) - 2
    mine = model.state_dict()
    compared = 0
    for k, v in state.items():
        if k not in report["skipped"]:
            assert torch.equal(mine[k], v), k
            compared += 1
    assert compared == report["loaded"]


def test_checkpoint_resizes_position_tables(tmp_path):
    state = sam_style_checkpoint(tmp_path / "sam_tiny.pth")
    model = build_hfsam(ModelSpec("tiny", 224, 3, 4))
    load_sam_weights(model, read_sam_state_dict(tmp_path / "sam_tiny.pth"), model.info, 224)
    pos = model.image_encoder.pos_embed
    assert pos.shape == (1, 14, 14, 64)
    want = F.interpolate(
        state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(14, 14), mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    assert torch.allclose(pos, want)
    # global blocks (1, 3) get 2*14-1 rows; windowed blocks keep 2*7-1
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (27, 32)
    assert model.image_encoder.blocks[0].attn.rel_pos_h.shape == (13, 32)
    assert torch.equal(model.image_encoder.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])


def test_sam_weights_load_by_name_into_the_released_blocks(tmp_path):
    """As the authors' load_from: every SAM decoder key by its name, into the reordered blocks; hf_token is new."""
    state = sam_style_checkpoint(tmp_path / "sam_tiny.pth")
    torch.manual_seed(1)
    model = build_hfsam(ModelSpec("tiny", 1024, 3, 4, "released"))
    report = load_sam_weights(model, read_sam_state_dict(tmp_path / "sam_tiny.pth"), model.info, 1024)
    assert report["loaded"] == len(state) - 2  # the SAM-only mask tokens and IoU head are skipped, as theirs
    mine = model.state_dict()
    transformer = [k for k in state if k.startswith("mask_decoder.transformer.")]
    assert len(transformer) > 20 and all(torch.equal(mine[k], state[k]) for k in transformer)
    assert "mask_decoder.hf_token.weight" not in state and mine["mask_decoder.hf_token.weight"].shape == (1, 64)
    # the blocks run in H-SAM's order: the same weights give another output than SAM's own transformer
    from segment_anything.modeling.transformer import TwoWayTransformer

    sam = TwoWayTransformer(depth=1, embedding_dim=64, num_heads=2, mlp_dim=128)
    sam.load_state_dict({k[len("mask_decoder.transformer.") :]: state[k] for k in transformer})
    src, pe, tokens = torch.randn(1, 64, 4, 4), torch.randn(1, 64, 4, 4), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert (model.mask_decoder.transformer(src, pe, tokens)[0] - sam(src, pe, tokens)[0]).abs().max() > 1e-2


def test_official_vit_b_key_layout_loads_strictly(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()  # random weights, official key names and shapes
    torch.save(sam.state_dict(), tmp_path / "sam_vit_b_random.pth")
    del sam
    model = build_hfsam(ModelSpec("vit_b", 224, 8, 5))
    report = load_sam_weights(model, read_sam_state_dict(tmp_path / "sam_vit_b_random.pth"), model.info, 224)
    assert any(k.startswith("mask_decoder.iou_prediction_head") for k in report["skipped"])
    assert model.image_encoder.pos_embed.shape == (1, 14, 14, 768)
    assert model.image_encoder.blocks[2].attn.rel_pos_h.shape == (27, 64)


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("unexpected", "unexpected"),
        ("missing", "missing"),
        ("wrong_width", "backbone"),
    ],
)
def test_checkpoint_mismatches_are_reported(tmp_path, case, fragment):
    path = tmp_path / "bad.pth"
    if case == "unexpected":
        sam_style_checkpoint(path, extra={"image_encoder.extra_layer.weight": torch.zeros(3)})
    elif case == "missing":
        sam_style_checkpoint(path, drop=["image_encoder.neck.0.weight"])
    else:
        state = sam_style_checkpoint(path)
        state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
        torch.save(state, path)
    model = build_hfsam(ModelSpec("tiny", 224, 3, 4))
    with pytest.raises(InputError, match=fragment):
        load_sam_weights(model, read_sam_state_dict(path), model.info, 224)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"image_encoder.patch_embed.proj.weight": _RunsCode(marker)}, f)
    with pytest.raises(InputError, match="not a loadable SAM checkpoint"):
        read_sam_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04truncated"])
def test_garbage_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(InputError):
        read_sam_state_dict(path)


def test_non_sam_state_dict_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(InputError, match="not a SAM checkpoint"):
        read_sam_state_dict(tmp_path / "resnet.pth")


def test_adapter_tensors_round_trip_bit_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    a = tiny(seed=3)
    for p in a.trainable_state_dict().values():
        p.add_(torch.randn_like(p))  # make every tensor non-trivial
    save_file({k: v.contiguous() for k, v in a.trainable_state_dict().items()}, tmp_path / "a.safetensors")
    b = tiny(seed=4)
    b.load_trainable_state_dict(load_file(tmp_path / "a.safetensors"))
    for k, v in a.trainable_state_dict().items():
        assert torch.equal(v, b.trainable_state_dict()[k]), k


def test_adapter_for_another_shape_is_refused():
    a = tiny(num_classes=3)
    b = tiny(num_classes=5)
    with pytest.raises(InputError, match="do not fit"):
        b.load_trainable_state_dict(a.trainable_state_dict())


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"img_size": 100}, "img-size"),
        ({"rank": -1}, "rank"),
        ({"fusion": "x"}, "fusion"),
        ({"backbone": "vit_x"}, "backbone"),
    ],
)
def test_bad_specs(kw, fragment):
    with pytest.raises(InputError, match=fragment):
        ModelSpec(**{"backbone": "tiny", **kw}).resolved()


# 224 px: whole windows; 160 (tiny) and 320 (vit_b): the token grid is padded to whole windows.
@pytest.mark.parametrize("backbone,size", [("tiny", 224), ("tiny", 160), ("vit_b", 224), ("vit_b", 320)])
@pytest.mark.parametrize("path", ["inference", "training"])
def test_fast_encoder_equals_sams_own_blocks(backbone, size, path):
    from HFSAMCore.model.attention import use_fast_encoder

    torch.manual_seed(0)
    model = build_hfsam(ModelSpec(backbone, size, 3, 4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or ".lora_B" in name:  # zero at init; make them matter
                p.normal_(std=0.5 if "rel_pos" in name else 0.05)
    x = torch.rand(2, 3, size, size)
    # inference: chunked CPU attention and merged LoRA; training: fused SDPA and LoRA branches
    with torch.set_grad_enabled(path == "training"):
        fast = model.encode(x)[0].detach()
        use_fast_encoder(model.image_encoder, False)
        slow = model.encode(x)[0].detach()
    assert fast.shape == slow.shape
    assert (fast - slow).abs().max() < 1e-4 * slow.abs().max()


def test_padded_window_tokens_project_to_the_qkv_bias():
    """The premise of skipping the padding's qkv projection: a zero token projects to the bias."""
    torch.manual_seed(0)
    model = build_hfsam(ModelSpec("tiny", 160, 3, 4)).eval()
    qkv = model.image_encoder.blocks[0].attn.qkv
    with torch.no_grad():
        qkv.lora_B_q.weight.normal_()
        assert torch.equal(qkv(torch.zeros(1, 1, 64)), qkv.bias.view(1, 1, -1))


def test_chunked_attention_equals_softmax_attention():
    from HFSAMCore.model import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 50, 16) for _ in range(3))
    reference = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    for chunk_bytes in (1, 50 * 50 * 4 * 5, 1 << 30):  # one head per chunk, 5 (uneven), all at once
        old, attention.CHUNK_BYTES = attention.CHUNK_BYTES, chunk_bytes
        try:
            out = attention.chunked_attention(q, k, v)
        finally:
            attention.CHUNK_BYTES = old
        assert (out - reference).abs().max() < 1e-5


def test_merged_lora_inference_equals_the_training_path():
    model = tiny(rank=4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.05)  # an adapter that changes the output
    x = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        merged = model(x)  # inference: LoRA folded into the qkv weight
    with torch.enable_grad():
        unmerged = model(x)  # training path: separate low-rank branches
    assert torch.allclose(merged, unmerged.detach(), atol=1e-5, rtol=1e-5)


def test_logits_to_labels_equals_resize_then_argmax_over_nchw():
    from torch.nn import functional as F

    from HFSAMCore.model.inference import logits_to_labels

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 32, 32).bfloat16()  # bf16 like the model's output; ties are likely
    for size in ((128, 128), (100, 77)):
        reference = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).argmax(1)
        labels = logits_to_labels(logits, size)
        assert labels.dtype == torch.uint8 and labels.shape == (3, *size)
        assert torch.equal(labels.long(), reference)


def test_a_pretrained_decoder_starts_where_it_was():
    """After start_fusion_near_identity the low-level branch gives zero and each AWFFM passes G through
    (sigmoid(5) G), whatever L; training then moves away from it."""
    m = AWFFM(dim=16, reduction=4)
    m.start_near_identity()
    g, low = torch.randn(2, 16, 5, 7), torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        out = m(g, torch.zeros_like(low))
        assert torch.allclose(out, torch.sigmoid(torch.tensor(5.0)) * g, atol=1e-6)  # borders included
        assert not torch.allclose(m(g, low), out, atol=1e-3)  # L still reaches the output
    model = HFSAM(ModelSpec("tiny", 64, 3, 2))
    model.start_fusion_near_identity()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        embedding, taps = model.encoder_features(x)
        assert float(model.compress_taps(taps).abs().max()) == 0.0


def test_token_upscaling_equals_sams_deconvolutions_on_a_non_square_map():
    """decoder.upscale (matrix products on tokens, outputs reordered for a fast depth-to-space) against
    SAM's own output_upscaling (ConvTranspose2d, LayerNorm2d, GELU) on NCHW; h != w so that a swapped
    axis cannot pass."""
    from HFSAMCore.model.decoder import HFSAMDecoder

    torch.manual_seed(5)
    dec = HFSAMDecoder(num_classes=2, transformer_dim=32, depth=1, mlp_dim=16, num_heads=2, fusion="none")
    with torch.no_grad():
        for p in dec.output_upscaling.parameters():  # biases start at 0, LayerNorm at 1/0: move them
            p.add_(0.3 * torch.randn_like(p))
        src = torch.randn(2, 32, 3, 5)
        want = dec.output_upscaling(src)  # [2, 4, 12, 20]
        got = dec.upscale(src.flatten(2).transpose(1, 2), 3, 5)  # [2, 12*20, 4]
    assert want.shape == (2, 4, 12, 20)
    torch.testing.assert_close(got.transpose(1, 2).reshape(2, 4, 12, 20), want, rtol=1e-5, atol=1e-5)


def test_token_upscaling_keeps_its_norm_in_fp32_under_bf16_autocast():
    """The deconvolution's fp32 bias makes its bf16 product fp32, so the LayerNorm and GELUs after it run in
    fp32: with the bias folded into the bf16 product, the LayerNorm's weight gradient (a sum over every
    pixel) came out about 20 % off at the real size. Here at a quarter of it, against an fp32 run."""
    from HFSAMCore.model.decoder import HFSAMDecoder

    torch.manual_seed(6)
    dec = HFSAMDecoder(num_classes=2, transformer_dim=256, depth=1, mlp_dim=16, num_heads=2, fusion="none")
    with torch.no_grad():
        for p in dec.output_upscaling.parameters():
            p.add_(0.3 * torch.randn_like(p))
    src = torch.randn(2, 32 * 32, 256)
    target = torch.randn(2, 128 * 128, 32)
    grads = {}
    for autocast in (False, True):
        dec.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            up = dec.upscale(src.to(torch.bfloat16) if autocast else src, 32, 32)
        assert up.dtype == torch.float32
        (up.float() * target).sum().backward()
        grads[autocast] = dec.output_upscaling[1].weight.grad.clone()
    error = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert error < 0.02, error
