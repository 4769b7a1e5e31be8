"""MOON-specific promises: guided routing, upcycling, pooling, checkpoints, backbones, croppers."""
import json
import numpy as np
import pytest
import torch
from PIL import Image

from moonsearch.models.base import Product, Query, create_encoder
from moonsearch.errors import UserError
from moonsearch.models.moon import moe as moe_mod
from moonsearch.models.moon.encoder import MoonConfig, build_model, load_pretrained, save_pretrained
from moonsearch.models.moon.tokens import ATTRIBUTE, CATEGORY, PAD, product_segments, query_segments
from moonsearch.vision.croppers import CentreCropper, GroundingCropper, SaliencyCropper, iou, parse_box

RED = Image.new("RGB", (90, 80), (200, 30, 30))


def _tiny_cfg(folder, **kw):
    return MoonConfig(backbone="qwen-vl", source=str(folder), image_size=56, **kw)


@pytest.fixture(scope="module")
def tiny_folder(moon_tiny):
    return moon_tiny.cfg.source


def test_category_and_attribute_tokens_reach_their_experts_and_others_do_not(moon_tiny):
    model = moon_tiny.model
    seen = []
    experts = model.moe_layers[0].experts
    hooks = [experts[i].register_forward_hook(lambda m, inp, out, i=i: seen.append((i, inp[0].shape[0])))
             for i in range(len(experts))]
    try:
        batch = [product_segments("red shoe", ["apparel", "shoes"], {"colour": "red"}, [RED], None)]
        inputs = model.adapter.prepare(batch)
        types = inputs["token_types"][0]
        n_cat, n_att = int((types == CATEGORY).sum()), int((types == ATTRIBUTE).sum())
        with torch.no_grad():
            model(batch)
        got = dict(seen)
        assert got[0] == n_cat and got[1] == n_att and n_cat > 0 and n_att > 0
        general = sum(n for i, n in seen if i >= 2)
        assert general == int((types != CATEGORY).sum() - (types == ATTRIBUTE).sum())
        # queries have no category or attribute spans: the guided experts stay idle
        seen.clear()
        with torch.no_grad():
            model([query_segments("red shoe", RED)])
        assert {i for i, _ in seen} <= set(range(2, len(experts)))
    finally:
        for h in hooks:
            h.remove()
    stats = model.routing_stats(reset=True)
    assert len(stats) == len(model.moe_layers) and all(sum(v) > 0 for v in stats.values())
    assert all(sum(v) == 0 for v in model.routing_stats().values())


@pytest.mark.parametrize("moe_cfg", [moe_mod.MoEConfig(), moe_mod.MoEConfig(n_general=3, top_k=2),
                                     moe_mod.MoEConfig(shared_expert=True), moe_mod.MoEConfig(low_rank=4)])
def test_upcycled_experts_leave_the_pretrained_output_unchanged(tiny_folder, moe_cfg):
    plain = build_model(_tiny_cfg(tiny_folder, use_moe=False)).eval()
    moe = build_model(_tiny_cfg(tiny_folder, moe=moe_cfg)).eval()
    batch = [product_segments("red shoe", ["a", "b"], {"k": "v"}, [RED], [RED]), query_segments("x", None)]
    with torch.no_grad():
        a, _, _ = plain(batch)
        b, aux, _ = moe(batch)
    assert torch.allclose(a, b, atol=1e-5)
    assert aux.item() > 0  # the load-balancing loss is returned for the trainer
    n_params = sum(p.numel() for p in moe.parameters())
    if moe_cfg.low_rank:  # low-rank experts are much smaller than full copies
        assert n_params < sum(p.numel() for p in build_model(_tiny_cfg(tiny_folder)).parameters())


@pytest.mark.parametrize("cfg", [moe_mod.MoEConfig(), moe_mod.MoEConfig(n_general=3, top_k=2),
                                 moe_mod.MoEConfig(guided=False)])
def test_each_token_gets_its_own_experts_output_whatever_the_batch_order(cfg):
    """The token-sorted dispatch against a per-token oracle: with experts that differ, every token's output
    is its guided expert's, or the gate-weighted sum of its top-k general experts'; a new batch (or the same
    map changed in place) is routed afresh, not by the previous batch's cached split."""
    torch.manual_seed(0)
    H = 16
    moe = moe_mod.GuidedMoE(torch.nn.Sequential(torch.nn.Linear(H, 24), torch.nn.SiLU(), torch.nn.Linear(24, H)),
                            H, cfg)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    tt = torch.randint(0, 7, (3, 20))
    reached = [0] * len(moe.experts)
    for step in range(3):
        if step == 2:
            tt[0, :10] = CATEGORY  # in place: the cached split of this map is stale
        x = torch.randn(3, 20, H)
        moe.token_types = tt
        with torch.no_grad():
            got = moe(x)
            for b in range(3):
                for t in range(20):
                    kind, v = int(tt[b, t]), x[b, t]
                    if cfg.guided and kind in (CATEGORY, ATTRIBUTE):
                        e = 0 if kind == CATEGORY else 1
                        want, reached[e] = moe.experts[e](v), reached[e] + 1
                    else:
                        w, sel = moe.gate(v).softmax(-1).topk(cfg.top_k)
                        want = sum(wi / w.sum() * moe.experts[2 + int(j)](v) for wi, j in zip(w, sel))
                        for j in sel:
                            reached[2 + int(j)] += 1
                    assert torch.allclose(got[b, t], want, atol=1e-5), (step, b, t, kind)
        tt = torch.randint(0, 7, (3, 20)) if step == 0 else tt
    assert moe.counts.tolist() == reached  # the routing statistics count what each expert really received
    # a split made while encoding (inference mode) serves a training step on the same layout
    moe.token_types = torch.randint(0, 7, (3, 20))  # a layout not seen yet: split in inference mode
    with torch.inference_mode():
        moe(torch.randn(3, 20, H))
    x = torch.randn(3, 20, H, requires_grad=True)
    moe(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (reached[0] > 0 and reached[1] > 0) if cfg.guided else reached[:2] == [0, 0]


def test_moe_trains_backward(tiny_folder):
    model = build_model(_tiny_cfg(tiny_folder, lora_rank=4)).train()
    batch = [product_segments("red shoe", ["a"], {"k": "v"}, [RED], None)]
    pooled, aux, _ = model(batch)
    (pooled.pow(2).sum() + aux).backward()
    gate = model.moe_layers[0].gate.weight.grad
    cat_expert = next(model.moe_layers[0].experts[0].parameters()).grad
    assert gate is not None and cat_expert is not None and cat_expert.abs().sum() > 0
    assert any("lora" in n for n, _ in model.named_parameters())


def test_pooling_ignores_padding_and_prompt(moon_tiny):
    short = Product("mug")
    long = Product("a very long title " * 8, ["home", "kitchen", "mugs"], {"colour": "blue", "size": "big"}, [RED])
    alone = moon_tiny.encode_products([short])
    padded = moon_tiny.encode_products([short, long])  # short is padded to long's length here
    assert np.allclose(alone[0], padded[0], atol=1e-5)
    inputs = moon_tiny.model.adapter.prepare(moon_tiny.product_batch([short, long]))
    assert (inputs["token_types"][0] == PAD).sum() > 10


def test_block_pooling_keeps_text_scores_free_of_photos(tiny_folder):
    """pool='blocks' + text first: a text query scores only the product's text block, so photos scale every
    product's text score by the same w and never reorder products for a text query; photo queries meet
    both blocks."""
    from moonsearch.models.moon.encoder import MoonEncoder

    model = build_model(_tiny_cfg(tiny_folder, pool="blocks", text_first=True, cropper="centre"))
    enc = MoonEncoder(model, "moon-tiny-blocks", "blocks")
    h = model.adapter.hidden_size
    assert enc.dim == 2 * h
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    titles = ["red mug", "green lamp", "blue chair", "yellow boots"]
    with_photos = enc.encode_products([Product(t, ["home"], {"colour": t.split()[0]},
                                               [Image.new("RGB", (64, 64), c)]) for t, c in zip(titles, colours)])
    without = enc.encode_products([Product(t, ["home"], {"colour": t.split()[0]}) for t in titles])
    w = model.cfg.text_pool_weight
    assert np.abs(without[:, h:]).max() == 0
    np.testing.assert_allclose(np.linalg.norm(with_photos[:, h:], axis=1), (1 - w * w) ** 0.5, atol=1e-5)
    q = enc.encode_queries([Query(text=t) for t in ("a mug", "boots", "blue furniture")])
    assert np.abs(q[:, h:]).max() == 0
    np.testing.assert_allclose(q @ with_photos.T, w * (q @ without.T), atol=1e-5)
    photo = enc.encode_queries([Query(image=Image.new("RGB", (64, 64), (200, 30, 30)))])
    a = model.cfg.image_to_text_weight
    np.testing.assert_allclose([np.linalg.norm(photo[0, :h]), np.linalg.norm(photo[0, h:])],
                               [a, (1 - a * a) ** 0.5], atol=1e-5)
    np.testing.assert_allclose(photo[0, :h] / a, photo[0, h:] / (1 - a * a) ** 0.5, atol=1e-5)


def test_text_block_puts_minilm_beside_the_vector_and_keeps_photo_queries_unreordered(tiny_folder):
    """text_block c: [(1-c^2)^.5 v, c MiniLM(text)]. Products carry MiniLM of title + category + attributes,
    text queries MiniLM of their text, photo queries an empty block (so they rank products as without the
    block); a product's words now reach a text query even where the LM cut has not learned them."""
    from moonsearch.models.base import product_text
    from moonsearch.models.moon.encoder import MoonEncoder
    from moonsearch.models.towers import MiniLMTextTower

    c = 0.55
    plain = MoonEncoder(build_model(_tiny_cfg(tiny_folder, pool="blocks", text_first=True, cropper="centre")),
                        "plain", "p")
    enc = MoonEncoder(build_model(_tiny_cfg(tiny_folder, pool="blocks", text_first=True, cropper="centre",
                                            text_block=c)), "with-text", "t")
    d = plain.dim
    assert enc.dim == d + MiniLMTextTower.dim
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    titles = ["red coffee mug", "green desk lamp", "blue office chair", "yellow rain boots"]
    prods = [Product(t, ["home", t.split()[-1]], {"colour": t.split()[0]}, [Image.new("RGB", (64, 64), col)])
             for t, col in zip(titles, colours)]
    p, p0 = enc.encode_products(prods), plain.encode_products(prods)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p[:, :d], (1 - c * c) ** 0.5 * p0, atol=1e-5)
    m = MiniLMTextTower().embed([product_text(x) for x in prods]).numpy()
    np.testing.assert_allclose(p[:, d:], c * m, atol=1e-5)
    photo = enc.encode_queries([Query(image=Image.new("RGB", (64, 64), (200, 30, 30)))])
    assert np.abs(photo[0, d:]).max() == 0
    photo0 = plain.encode_queries([Query(image=Image.new("RGB", (64, 64), (200, 30, 30)))])
    np.testing.assert_allclose(photo[0, :d], photo0[0], atol=1e-6)  # a unit row that ranks as before
    np.testing.assert_allclose(photo @ p.T, (1 - c * c) ** 0.5 * (photo0 @ p0.T), atol=1e-5)
    # the untrained tiny LM matches spellings, not meanings; with the block more paraphrases find their product
    para = [Query(text=t) for t in ("a cup for coffee", "lamp for my desk", "chair for the office", "boots for rainy days")]
    own = np.arange(4)
    found = int(((enc.encode_queries(para) @ p.T).argmax(1) == own).sum())
    found_plain = int(((plain.encode_queries(para) @ p0.T).argmax(1) == own).sum())
    assert found >= 3 and found > found_plain, (found, found_plain)
    with pytest.raises(UserError, match="text_block"):
        MoonEncoder(build_model(_tiny_cfg(tiny_folder, text_block=1.0)), "bad", "b")


def test_save_load_round_trip_is_bit_exact(moon_tiny, tmp_path):
    folder = save_pretrained(moon_tiny.model, tmp_path / "ckpt")
    again = create_encoder(f"moon:{folder}")
    assert isinstance(again.fingerprint, str) and again.name == f"moon:{folder}"
    prods = [Product("red shoe", ["apparel"], {"colour": "red"}, [RED])]
    assert np.array_equal(moon_tiny.encode_products(prods), again.encode_products(prods))
    a = dict(moon_tiny.model.state_dict())
    b = dict(load_pretrained(folder).model.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen2_5_vl_family_goes_through_the_same_adapter(tmp_path):
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl

    folder = save_tiny_qwen_vl(tmp_path / "q25", family="qwen2_5_vl")
    enc = create_encoder(f"moon:{folder}")
    with_img = enc.encode_queries([Query("red", RED)])
    other_img = enc.encode_queries([Query("red", Image.new("RGB", (90, 80), (10, 200, 10)))])
    assert with_img.shape == (1, 64)
    assert not np.allclose(with_img, other_img)  # image positions are used, not silently dropped


@pytest.mark.parametrize("answer,box", [
    ('[{"bbox_2d": [10, 20, 60, 70], "label": "shoe"}]', (10, 20, 60, 70)),
    ("<|box_start|>(100,200),(600,700)<|box_end|>", (10, 20, 60, 70)),
    ("the box is [0.1, 0.2, 0.6, 0.7]", (10, 20, 60, 70)),
    ('```json\n[{"bbox_2d": [10, 20, 104, 70]}]\n```', (10, 20, 100, 70)),  # small overshoot clipped
])
def test_parse_box_understands_grounding_answers(answer, box):
    assert parse_box(answer, 100, 100) == box


@pytest.mark.parametrize("answer", ["", "I cannot see a product", '[{"bbox_2d": [60, 20, 10, 70]}]',
                                    '[{"bbox_2d": [10, 20, 900, 70]}]', '[{"bbox_2d": "nope"}]', "{not json",
                                    '[{"bbox_2d": [10, 10, 11, 11]}]', "[1, 2, 3]"])
def test_parse_box_rejects_malformed_answers(answer):
    assert parse_box(answer, 100, 100) is None


def test_grounding_cropper_falls_back_on_garbage(tmp_path):
    class Garbage(GroundingCropper):
        def answer(self, image, title):
            return "}{ <|box_start|>(oops"

    class Broken(GroundingCropper):
        def answer(self, image, title):
            raise RuntimeError("generation failed")

    img = Image.new("RGB", (100, 100), (255, 255, 255))
    for cls in (Garbage, Broken):
        c = cls(None, None, fallback=CentreCropper())
        assert c.box(img, "shoe") == CentreCropper().box(img) and c.fallbacks == 1


def test_saliency_cropper_finds_the_product_on_plain_backgrounds():
    from moonsearch.data.render import render
    from moonsearch.data.synthetic import sample_specs

    rng = np.random.default_rng(0)
    scores = []
    for spec in sample_specs(30, seed=2):
        img, box = render(spec, rng, 160, "listing")
        scores.append((iou(SaliencyCropper().box(img), box), iou(CentreCropper().box(img), box)))
    sal, cen = np.mean(scores, axis=0)
    assert sal > 0.4 and sal > cen


def test_crops_are_computed_once_per_image_and_persisted(tmp_path, tiny_folder):
    from moonsearch.models.moon.encoder import MoonEncoder

    calls = []

    class Counting(CentreCropper):
        name = "centre"

        def box(self, image, title=""):
            calls.append(1)
            return super().box(image, title)

    enc = MoonEncoder(build_model(_tiny_cfg(tiny_folder, cropper="centre")), "t", "f")
    enc.cropper = Counting()
    enc.use_crop_cache(tmp_path / "boxes.jsonl")
    prods = [Product("a", images=[RED, Image.new("RGB", (90, 80), (0, 0, 200))])]
    first = enc.encode_products(prods)
    assert np.allclose(enc.encode_products(prods), first) and len(calls) == 2
    again = MoonEncoder(build_model(_tiny_cfg(tiny_folder, cropper="centre")), "t", "f")
    again.cropper = Counting()
    again.use_crop_cache(tmp_path / "boxes.jsonl")
    again.encode_products(prods)
    assert len(calls) == 2  # a new process reads the boxes instead of cropping again


def test_grounding_cropper_is_selectable_from_a_config():
    """cropper: grounding builds a GroundingCropper around the qwen-vl backbone's own generative model
    (a tiny local Qwen2-VL here) and the encoder runs with it; without a source it is one clear error."""
    from dataclasses import replace

    from moonsearch.errors import UserError
    from moonsearch.models.moon import builtin_config
    from moonsearch.models.moon.encoder import MoonConfig, fresh_encoder
    from moonsearch.models.base import Product

    cfg = replace(builtin_config("moon-tiny"), cropper="grounding")
    enc = fresh_encoder(cfg, "tiny-grounding")
    assert isinstance(enc.cropper, GroundingCropper)
    assert enc.cropper.model.config.model_type == "qwen2_vl" and hasattr(enc.cropper.model, "generate")
    img = Image.new("RGB", (96, 96), (255, 255, 255))
    img.paste((200, 30, 30), (30, 30, 70, 70))
    v = enc.encode_products([Product("red box", images=[img])])
    assert v.shape == (1, enc.dim) and np.isfinite(v).all()
    # an untrained model answers garbage: the box comes from the fallback, and that is counted
    assert enc.cropper.fallbacks >= 1
    with pytest.raises(UserError, match="grounding_source"):
        fresh_encoder(MoonConfig(cropper="grounding"), "x")
    with pytest.raises(UserError, match="cropper 'nope'"):
        fresh_encoder(replace(cfg, cropper="nope"), "x")


def test_models_never_import_vision():
    """The encoders get their cropper from the registry in moonsearch.models.cropping, which the
    vision package fills: no module under moonsearch/models names moonsearch.vision."""
    import pathlib
    import re

    import moonsearch

    root = pathlib.Path(moonsearch.__file__).parent / "models"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+moonsearch\.vision", p.read_text(), re.M)]
    assert offenders == []
    from moonsearch.models.cropping import cropper_names

    assert {"centre", "saliency", "detector", "grounding"} <= set(cropper_names())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_batched_vision_windows_match_the_per_window_loop(tmp_path, family, monkeypatch):
    """The one-call SDPA over equal-length vision windows gives the vision tower's output of
    transformers' per-window loop (same-sized pictures), and falls back to it for unequal windows."""
    from transformers import AutoImageProcessor, AutoModel

    from moonsearch.models.moon.adapters import batch_vision_windows
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl

    folder = save_tiny_qwen_vl(tmp_path / family, family=family)
    ref, fast = AutoModel.from_pretrained(folder).eval(), AutoModel.from_pretrained(folder).eval()
    assert batch_vision_windows(fast) == len(fast.visual.blocks)
    proc = AutoImageProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    for sizes in ([(112, 112), (112, 112)], [(112, 112), (84, 140)]):  # uniform windows, then mixed
        imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        p = proc(images=imgs, return_tensors="pt")
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.no_grad():
            a = ref.visual(p["pixel_values"], grid_thw=p["image_grid_thw"])
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                                lambda *x, **kw: calls.append(1) or sdpa(*x, **kw))
            b = fast.visual(p["pixel_values"], grid_thw=p["image_grid_thw"])
            monkeypatch.undo()
        uniform = sizes[0] == sizes[1]
        # one batched call per block when the windows are equal; the per-window loop otherwise
        assert (len(calls) == len(fast.visual.blocks)) == uniform, len(calls)
        a = getattr(a, "pooler_output", a)
        b = getattr(b, "pooler_output", b)
        a = a[0] if isinstance(a, (tuple, list)) else a
        b = b[0] if isinstance(b, (tuple, list)) else b
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_padding_mlp_widths_keeps_the_outputs_and_the_padding_untrained(tmp_path):
    """pad_mlp_width widens the gated MLPs (the GPU path pads Qwen2.5-VL's 3,420-wide vision MLP) with zeros:
    the vision tower's and the language model's outputs must not move, and training must leave the padding
    at zero (no gradient reaches it), or a padded model would drift from the unpadded one."""
    from transformers import AutoImageProcessor, AutoModel

    from moonsearch.models.moon.adapters import pad_mlp_width, unpad_mlp_width
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl

    folder = save_tiny_qwen_vl(tmp_path / "q", family="qwen2_5_vl")
    ref, padded = AutoModel.from_pretrained(folder).eval(), AutoModel.from_pretrained(folder).eval()
    n_mlps = sum(hasattr(m, "gate_proj") for m in padded.modules())
    assert pad_mlp_width(padded, multiple=48) == n_mlps  # 64 (vision) and 128 (text) are not multiples of 48
    assert padded.visual.blocks[0].mlp.gate_proj.out_features == 96
    assert padded.language_model.layers[0].mlp.down_proj.in_features == 144
    assert pad_mlp_width(padded, multiple=48) == 0  # already aligned: nothing to do
    rng = np.random.default_rng(0)
    proc = AutoImageProcessor.from_pretrained(folder)
    p = proc(images=[Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))], return_tensors="pt")
    x = torch.randn(2, 7, ref.config.text_config.hidden_size)
    with torch.no_grad():
        for model_out in ((lambda m: m.visual(p["pixel_values"], grid_thw=p["image_grid_thw"])),
                          (lambda m: m.language_model(inputs_embeds=x))):
            a, b = model_out(ref), model_out(padded)
            a, b = (getattr(o, "pooler_output", None) if getattr(o, "pooler_output", None) is not None
                    else getattr(o, "last_hidden_state", o) for o in (a, b))
            assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # checkpoints never see the padding: state_dict writes the own widths, load_state_dict takes either
    own = ref.state_dict()
    written = padded.state_dict()
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in own.items()}
    assert all(torch.equal(written[k], own[k]) for k in own)
    padded.load_state_dict(own)
    padded.load_state_dict(written)
    assert padded.visual.blocks[0].mlp.gate_proj.weight.shape[0] == 96
    mlp = padded.language_model.layers[0].mlp
    mlp(torch.randn(3, x.shape[-1])).pow(2).sum().backward()
    assert mlp.gate_proj.weight.grad[128:].abs().max() == 0 and mlp.up_proj.weight.grad[128:].abs().max() == 0
    assert mlp.down_proj.weight.grad[:, 128:].abs().max() == 0
    assert mlp.gate_proj.weight.grad[:128].abs().max() > 0
    # the trainer undoes it and trains at the own shapes
    assert unpad_mlp_width(padded) == n_mlps
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in own.items()}
    assert padded.language_model.layers[0].mlp.down_proj.in_features == 128
    assert unpad_mlp_width(padded) == 0


def test_the_trainer_pads_only_mlps_that_do_not_train(tmp_path):
    """On a GPU the trainer pads the frozen MLPs (the vision tower's) and leaves the trainable ones at the
    checkpoint's own widths, so optimizer state never holds padded shapes."""
    from transformers import AutoModel

    from moonsearch.models.moon.adapters import pad_mlp_width
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl

    model = AutoModel.from_pretrained(save_tiny_qwen_vl(tmp_path / "q", family="qwen2_5_vl"))
    model.visual.requires_grad_(False)
    model.visual.blocks[0].mlp.up_proj.requires_grad_(True)  # one vision MLP still trains
    n_frozen = sum(hasattr(b.mlp, "gate_proj") for b in model.visual.blocks) - 1
    assert pad_mlp_width(model, multiple=48, frozen_only=True) == n_frozen
    assert model.visual.blocks[0].mlp.gate_proj.out_features == 64  # trains: its own width
    assert model.visual.blocks[1].mlp.gate_proj.out_features == 96  # frozen: padded
    assert model.language_model.layers[0].mlp.gate_proj.out_features == 128  # trains: its own width


@pytest.mark.slow  # ~30 s of torch.compile on 2 cores
def test_compiling_for_inference_keeps_the_vectors_and_the_checkpoint_names(moon_tiny):
    """MOONSEARCH_COMPILE=1 compiles the norms and MLPs in place on CUDA: the encoding must not move, the
    state_dict must keep its names (a torch.compile wrapper would add `_orig_mod.`), and uncompile (what
    the trainer calls) must restore every module."""
    from moonsearch.models.moon.adapters import compile_for_inference, uncompile

    model = moon_tiny.model
    batch = [product_segments("red shoe", ["apparel", "shoes"], {"colour": "red"}, [RED], None)]
    with torch.no_grad():
        before = model(batch)[0]
    keys = list(model.state_dict())
    n = compile_for_inference(model)
    try:
        assert n > 0 and compile_for_inference(model) == 0
        with torch.no_grad():
            after = model(batch)[0]
        assert torch.allclose(before, after, atol=1e-5), float((before - after).abs().max())
        assert list(model.state_dict()) == keys
    finally:
        assert uncompile(model) == n
    assert uncompile(model) == 0


def test_the_cached_smollm2_copy_loads_whole_as_moon_minis_base_model():
    """moon-mini's LM is a copy of the packaged GGUF, written into the cache on first use. The base model
    that moon-mini loads must find every weight in it: a missing one (SmolLM2's embedding table is tied
    to its LM head) would be initialised at random without an error."""
    from transformers import AutoModel

    from moonsearch.models.moon.backbones import smollm2_folder

    folder = smollm2_folder()
    _, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
