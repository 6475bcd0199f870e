"""The ComfyUI side of tests/test_comfyui.py, run in its own process: ComfyUI's imports pick
devices and threads for the whole process, and the empty torchvision stub must not leak into the
rest of the suite.

    python tests/comfyui_checks.py COMFYUI_ROOT WORK_DIR

WORK_DIR holds ``spec.json`` (model folders) and ``embeddings/`` (the xti files the test wrote).
Every check runs through ComfyUI's own code (its tokenizer, CLIP, samplers, embedding loading);
the script writes ``results.json`` (facts the test asserts) and ``contexts.safetensors`` (contexts
the test compares with xti's own). Each ComfyUI-side reference for a layer is ComfyUI's encoding
of the prompt with ``embedding:NAME`` files that hold that layer's vectors.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)
torch.set_grad_enabled(False)  # as ComfyUI runs its graphs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "comfyui"))

import run_workflow  # noqa: E402

PROMPT = "a photo of <a> on a table"
NEGATIVE = "blurry"
MIX_PROMPT = "a photo of <a>"


def _import_loader() -> Any:
    """The pack's loader module alone (to load models before the pack is installed)."""
    spec = importlib.util.spec_from_file_location(
        "xti_checks_loader", REPO / "comfyui" / "xti_nodes" / "loader.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class Spy:
    """An attn2 patch registered after the node's: records what each cross-attention receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, torch.Tensor, list[int]]] = []

    def __call__(self, n: Any, context: Any, value: Any, extra: dict[str, Any]) -> Any:
        block = extra["block"]
        self.calls.append(
            (
                f"{block[0]}:{block[1]}",
                extra.get("block_index", 0),
                context.clone(),
                list(extra["cond_or_uncond"]),
            )
        )
        return n, context, value


def main() -> int:
    root, work = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads((work / "spec.json").read_text())
    run_workflow.setup_comfyui(root, stub_torchvision=True, cpu=True)
    import comfy.sd1_clip
    import folder_paths
    import nodes as comfy_nodes
    from safetensors.torch import load_file, save_file

    emb = work / "embeddings"
    folder_paths.add_model_folder_path("embeddings", str(emb))
    res: dict[str, Any] = {}
    out: dict[str, torch.Tensor] = {}

    loader = _import_loader()
    sd1 = loader.load_diffusers_folder(spec["demo"])
    sdxl = loader.load_diffusers_folder(spec["sdxl"])

    def sample(
        model: Any, pos: Any, neg: Any, batch: int = 2, advanced: bool = False
    ) -> torch.Tensor:
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, batch)[0]
        if advanced:
            node = comfy_nodes.KSamplerAdvanced()
            return node.sample(
                model, "enable", 3, 2, 5.0, "euler", "normal", pos, neg, latent, 0, 2, "disable"
            )[0]["samples"]
        return comfy_nodes.KSampler().sample(model, 3, 2, 5.0, "euler", "normal", pos, neg, latent)[
            0
        ]["samples"]

    def encode(clip: Any, text: str) -> list[list[Any]]:
        return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]

    # --- a stock graph before the pack is installed
    stock_before = sample(sd1.model, encode(sd1.clip, "a red cross"), encode(sd1.clip, NEGATIVE))

    nodes = run_workflow.load_nodes()
    res["diffusers_imported_by_the_pack"] = "diffusers" in sys.modules
    XTI = nodes.NODE_CLASS_MAPPINGS["XTIEmbedding"]()
    cond_mod = sys.modules["xti_nodes.conditioning"]

    def ref_files(
        src: str,
        layers: list[str],
        prefix: str,
        plain: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]],
    ) -> None:
        raw = load_file(str(emb / src))
        for layer in layers:
            save_file(plain(raw, layer), str(emb / f"{prefix}_{layer}.safetensors"))

    def native(clip: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        c, p = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return c.float(), p.float()

    # ---------------------------------------------------------------- SD1 (the demo model)
    model, clip = sd1.model, sd1.clip
    scheme = cond_mod.comfy_layer_scheme(model.model.diffusion_model)
    layers = scheme.names
    res["sd1_layers"] = layers
    ref_files("sd1_a.xti.safetensors", layers, "a", lambda raw, n: {"emb_params": raw[n]})
    m_a, c_a = XTI.apply(model, clip, str(emb / "sd1_a.xti.safetensors"), PROMPT)
    r_a = cond_mod.encode_xti(model, clip, [(str(emb / "sd1_a.xti.safetensors"), None)], PROMPT)
    refs = {n: native(clip, PROMPT.replace("<a>", f"embedding:a_{n}"))[0] for n in layers}
    res["sd1_exact"] = {n: bool(torch.equal(r_a.contexts[n], refs[n])) for n in layers}
    res["sd1_layers_differ"] = len({refs[n].sum().item() for n in layers}) == len(layers)
    for n in layers:
        out[f"sd1.{n}"] = r_a.contexts[n][0]
    out["sd1.plain"] = native(clip, "a photo of a cat on a table")[0][0]

    # what each cross-attention receives while sampling: CFG, batch 2, a negative prompt
    neg = encode(clip, NEGATIVE)
    neg_ctx = neg[0][0].float()
    spy = Spy()
    m_spy = m_a.clone()
    m_spy.set_model_attn2_patch(spy)
    sample(m_spy, c_a, neg, batch=2)
    seen_cond, seen_uncond, blocks = [], [], set()
    for block, _, ctx, cu in spy.calls:
        kind, num = block.split(":")
        lname = cond_mod.layer_name((kind, int(num)), 0, False)
        blocks.add(lname)
        size = ctx.shape[0] // len(cu)
        for r in range(ctx.shape[0]):
            if cu[r // size] == 0:
                seen_cond.append(bool(torch.equal(ctx[r : r + 1].float(), refs[lname])))
            else:
                seen_uncond.append(bool(torch.equal(ctx[r : r + 1].float(), neg_ctx)))
    res["sd1_sampling"] = {
        "blocks": sorted(blocks),
        "cond_rows_exact": all(seen_cond),
        "n_cond_rows": len(seen_cond),
        "uncond_rows_untouched": all(seen_uncond),
        "n_uncond_rows": len(seen_uncond),
        "cond_or_uncond": spy.calls[0][3],
    }

    # KSamplerAdvanced with the same graph
    spy2 = Spy()
    m_spy2 = m_a.clone()
    m_spy2.set_model_attn2_patch(spy2)
    sample(m_spy2, c_a, neg, batch=1, advanced=True)
    ok = []
    for block, _, ctx, cu in spy2.calls:
        kind, num = block.split(":")
        lname = cond_mod.layer_name((kind, int(num)), 0, False)
        size = ctx.shape[0] // len(cu)
        ok += [
            bool(torch.equal(ctx[r : r + 1].float(), refs[lname]))
            for r in range(ctx.shape[0])
            if cu[r // size] == 0
        ]
    res["sd1_advanced_exact"] = bool(ok) and all(ok)

    # all layers equal == ComfyUI's native embedding of that vector (same sampled latents)
    m_eq, c_eq = XTI.apply(model, clip, str(emb / "sd1_eq.xti.safetensors"), "a photo of <eq>")
    raw_eq = load_file(str(emb / "sd1_eq.xti.safetensors"))
    save_file({"emb_params": raw_eq["IN01"]}, str(emb / "eq_plain.safetensors"))
    lat_node = sample(m_eq, c_eq, neg, batch=2)
    lat_native = sample(model, encode(clip, "a photo of embedding:eq_plain"), neg, batch=2)
    res["sd1_equal_layers_same_image"] = bool(torch.equal(lat_node, lat_native))
    res["sd1_equal_layers_vs_stock_differs"] = not bool(torch.equal(lat_node, stock_before[:2]))

    # two layers swapped: exactly those contexts change (and trade places)
    r_s = cond_mod.encode_xti(model, clip, [(str(emb / "sd1_swap.xti.safetensors"), None)], PROMPT)
    changed = [n for n in layers if not torch.equal(r_s.contexts[n], r_a.contexts[n])]
    res["sd1_swap_changed"] = changed
    res["sd1_swap_traded"] = bool(
        torch.equal(r_s.contexts["IN04"], r_a.contexts["OUT08"])
        and torch.equal(r_s.contexts["OUT08"], r_a.contexts["IN04"])
    )

    # mixing two files by layer groups
    ref_files("sd1_b.xti.safetensors", layers, "b", lambda raw, n: {"emb_params": raw[n]})
    files = [(str(emb / "sd1_a.xti.safetensors"), None), (str(emb / "sd1_b.xti.safetensors"), None)]
    r_m = cond_mod.encode_xti(model, clip, files, MIX_PROMPT, mix={"<a>": "coarse", "<b>": "fine"})
    coarse = set(scheme.select("coarse"))
    mixed = {}
    for i, n in enumerate(layers):
        who = "a" if i in coarse else "b"
        mixed[n] = bool(
            torch.equal(r_m.contexts[n], native(clip, f"a photo of embedding:{who}_{n}")[0])
        )
    res["sd1_mix"] = {"coarse": [layers[i] for i in sorted(coarse)], "exact": mixed}
    # per-layer prompts (P+ without training)
    c_p = XTI.apply(model, clip, "", "a red cube", layer_prompts="mid=a green lizard")[1]
    res["sd1_layer_prompts_node_base"] = bool(torch.equal(c_p[0][0], native(clip, "a red cube")[0]))
    r_p = cond_mod.encode_xti(
        model, clip, [], "a red cube", layer_prompts={"mid": "a green lizard"}
    )
    res["sd1_layer_prompts"] = {
        n: bool(
            torch.equal(
                r_p.contexts[n], native(clip, "a green lizard" if n == "MID" else "a red cube")[0]
            )
        )
        for n in layers
    }

    # clip skip (CLIPSetLastLayer) applies to the per-layer encodings as to any prompt
    skip = comfy_nodes.CLIPSetLastLayer().set_last_layer(clip, -2)[0]
    r_k = cond_mod.encode_xti(model, skip, [(str(emb / "sd1_a.xti.safetensors"), None)], PROMPT)
    res["sd1_clip_skip"] = {
        n: bool(
            torch.equal(r_k.contexts[n], native(skip, PROMPT.replace("<a>", f"embedding:a_{n}"))[0])
        )
        and not bool(torch.equal(r_k.contexts[n], r_a.contexts[n]))
        for n in layers
    }

    # two XTI conditionings in one graph: node 2 patches node 1's model
    m_ab, c_b = XTI.apply(m_a, clip, str(emb / "sd1_b.xti.safetensors"), "a <b> on a table")
    r_b = cond_mod.encode_xti(
        model, clip, [(str(emb / "sd1_b.xti.safetensors"), None)], "a <b> on a table"
    )
    both = {}
    for label, cond, ref in (("first", c_a, r_a), ("second", c_b, r_b)):
        spy3 = Spy()
        m3 = m_ab.clone()
        m3.set_model_attn2_patch(spy3)
        sample(m3, cond, neg, batch=1)
        flags = []
        for block, _, ctx, cu in spy3.calls:
            kind, num = block.split(":")
            lname = cond_mod.layer_name((kind, int(num)), 0, False)
            size = ctx.shape[0] // len(cu)
            flags += [
                bool(torch.equal(ctx[r : r + 1].float(), ref.contexts[lname]))
                for r in range(ctx.shape[0])
                if cu[r // size] == 0
            ]
        both[label] = bool(flags) and all(flags)
    res["sd1_two_conditionings"] = both

    # errors, as the node reports them
    def error_of(fn: Callable[[], Any]) -> str | None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (the message is the result)
            return f"{type(exc).__name__}: {exc}"
        return None

    res["errors"] = {
        "no_placeholder": error_of(
            lambda: XTI.apply(model, clip, str(emb / "sd1_a.xti.safetensors"), "a photo of a cat")
        ),
        "sd1_on_sdxl": error_of(
            lambda: XTI.apply(sdxl.model, sdxl.clip, str(emb / "sd1_a.xti.safetensors"), PROMPT)
        ),
        "wrong_width": error_of(
            lambda: XTI.apply(model, clip, str(emb / "sd1_wide.xti.safetensors"), PROMPT)
        ),
        "nan": error_of(
            lambda: XTI.apply(model, clip, str(emb / "sd1_nan.xti.safetensors"), PROMPT)
        ),
        "missing_file": error_of(
            lambda: XTI.apply(model, clip, str(emb / "nope.xti.safetensors"), PROMPT)
        ),
        "nothing": error_of(lambda: XTI.apply(model, clip, "", PROMPT)),
    }

    # ComfyUI's own embedding loading of the native files (no node): the fallback keys
    raw_a = load_file(str(emb / "sd1_a.xti.safetensors"))
    got = comfy.sd1_clip.load_embed("sd1_a.xti", [str(emb)], 64, "clip_l")
    mean = torch.stack([raw_a[n] for n in layers]).mean(dim=0)
    save_file({"emb_params": mean}, str(emb / "a_mean.safetensors"))
    with_mean = native(clip, "a photo of embedding:a_mean")[0]
    res["native_sd1"] = {
        "is_mean": bool(torch.equal(got, mean)),
        "is_first_layer": bool(torch.equal(got, raw_a["IN01"])),
        "prompt_uses_mean": bool(
            torch.equal(native(clip, "a photo of embedding:sd1_a.xti")[0], with_mean)
        ),
    }

    # ---------------------------------------------------------------- SDXL (tiny, both encoders)
    model, clip = sdxl.model, sdxl.clip
    for gran, fname in (
        ("block", "sdxl_a.xti.safetensors"),
        ("transformer", "sdxl_tf.xti.safetensors"),
    ):
        scheme = cond_mod.comfy_layer_scheme(model.model.diffusion_model, gran)
        names = scheme.names
        prefix = "xa" if gran == "block" else "xt"
        ref_files(
            fname,
            names,
            prefix,
            lambda raw, n: {"clip_l": raw[f"clip_l.{n}"], "clip_g": raw[f"clip_g.{n}"]},
        )
        r = cond_mod.encode_xti(model, clip, [(str(emb / fname), None)], PROMPT)
        refs = {n: native(clip, PROMPT.replace("<a>", f"embedding:{prefix}_{n}")) for n in names}
        res[f"sdxl_{gran}_layers"] = names
        if gran == "transformer":  # no POOL vectors: the pooled output is the layers' mean
            mean_pooled = torch.stack([refs[n][1] for n in names]).mean(dim=0)
            res["sdxl_mean_pooled_exact"] = bool(torch.equal(r.pooled, mean_pooled))
        res[f"sdxl_{gran}_exact"] = {n: bool(torch.equal(r.contexts[n], refs[n][0])) for n in names}
        for n in names:
            out[f"sdxl_{gran}.{n}"] = r.contexts[n][0]
        if gran == "block":
            raw = load_file(str(emb / fname))
            save_file(
                {
                    "clip_l": torch.stack([raw[f"clip_l.{n}"] for n in names]).mean(0),
                    "clip_g": raw["clip_g.POOL"],
                },
                str(emb / "xa_pool.safetensors"),
            )
            res["sdxl_pool_exact"] = bool(
                torch.equal(r.pooled, native(clip, PROMPT.replace("<a>", "embedding:xa_pool"))[1])
            )
            out["sdxl.pooled"] = r.pooled[0]
        # the patch while sampling (block: 11 layers; transformer: every transformer block)
        neg = encode(clip, NEGATIVE)
        spy = Spy()
        m_s, c_s = XTI.apply(model, clip, str(emb / fname), PROMPT)
        m_s.set_model_attn2_patch(spy)
        sample(m_s, c_s, neg, batch=2)
        flags, unflags, seen = [], [], set()
        for block, k, ctx, cu in spy.calls:
            kind, num = block.split(":")
            lname = cond_mod.layer_name((kind, int(num)), k, gran == "transformer")
            seen.add(lname)
            size = ctx.shape[0] // len(cu)
            for row in range(ctx.shape[0]):
                if cu[row // size] == 0:
                    flags.append(bool(torch.equal(ctx[row : row + 1].float(), refs[lname][0])))
                else:
                    unflags.append(bool(torch.equal(ctx[row : row + 1].float(), neg[0][0].float())))
        res[f"sdxl_{gran}_sampling"] = {
            "layers_seen": sorted(seen),
            "cond_rows_exact": bool(flags) and all(flags),
            "uncond_rows_untouched": bool(unflags) and all(unflags),
        }
    out["sdxl.plain"] = native(clip, "a photo of a cat on a table")[0][0]
    raw_x = load_file(str(emb / "sdxl_a.xti.safetensors"))
    xl_names = res["sdxl_block_layers"]
    native_xl = {}
    for enc, width in (("clip_l", 32), ("clip_g", 48)):
        got = comfy.sd1_clip.load_embed("sdxl_a.xti", [str(emb)], width, enc)
        mean = torch.stack([raw_x[f"{enc}.{n}"] for n in xl_names]).mean(dim=0)
        native_xl[enc] = bool(torch.equal(got, mean)) and not bool(
            torch.equal(got, raw_x[f"{enc}.{xl_names[0]}"])
        )
    res["native_sdxl"] = native_xl

    # ---------------------------------------------------------------- stock graph after
    stock_after = sample(sd1.model, encode(sd1.clip, "a red cross"), encode(sd1.clip, NEGATIVE))
    res["stock_graph_identical"] = bool(torch.equal(stock_before, stock_after))

    # the same contexts with ComfyUI's --fp32-text-enc (its default on CPU is a float16 CLIP)
    import comfy.cli_args

    comfy.cli_args.args.fp32_text_enc = True
    for label, folder, cases in (
        ("sd1", spec["demo"], [("sd1", "sd1_a.xti.safetensors", "block")]),
        (
            "sdxl",
            spec["sdxl"],
            [
                ("sdxl_block", "sdxl_a.xti.safetensors", "block"),
                ("sdxl_transformer", "sdxl_tf.xti.safetensors", "transformer"),
            ],
        ),
    ):
        m32 = loader.load_diffusers_folder(folder)
        res[f"{label}_fp32_dtype"] = str(
            m32.clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.dtype
        )
        out[f"fp32.{label}.plain"] = native(m32.clip, "a photo of a cat on a table")[0][0]
        for key, fname, _gran in cases:
            r = cond_mod.encode_xti(m32.model, m32.clip, [(str(emb / fname), None)], PROMPT)
            for n, c in r.contexts.items():
                out[f"fp32.{key}.{n}"] = c[0]
    res["default_dtype"] = str(
        clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.dtype
    )

    save_file({k: v.contiguous() for k, v in out.items()}, str(work / "contexts.safetensors"))
    (work / "results.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
