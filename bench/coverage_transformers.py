"""Coverage of exported transformer architectures: which heads and MLP neurons onnxprune can remove.

    pip install -e ".[bench]"
    python bench/coverage_transformers.py [--only roberta,t5] [--exporter ts,dynamo] [--json out.json]

For each Hugging Face architecture (tiny random config: hidden 64, 2 layers, 4 heads, 2 K/V heads
where the family has GQA, MLP 128) and each torch.onnx exporter (TorchScript, dynamo), into the
git-ignored bench/models/coverage/:
- the prunable groups: attention-head groups (with Softmax) and MLP neuron groups; other frozen
  groups besides the residual stream (normalized over the hidden size) and the logits, with their
  first reason;
- the oracle: a random half of every group's units zeroed in place vs physically removed, at three
  (batch, sequence) shapes; the largest relative L2 difference of the outputs;
- ``onnxprune.prune(structured=True, sparsity=0.5, head_sparsity=0.5)``: heads/neurons per group
  before -> after, MACs kept, and the pruned model run at the three shapes (shapes equal, finite).
A failing export is reported as such (an exporter limit, not onnxprune's). One row per export.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "models" / "coverage"
sys.path.insert(0, str(HERE.parent / "fixtures"))

from export_transformers import _wrapper  # the fixtures' export wrapper

SHAPES = [(1, 5), (2, 16), (1, 33)]

# family -> (task, config overrides); "family+variant" names another config of the same family. Every
# config also gets the tiny sizes below where it has the key.
ARCHS = {
    "bert": ("base", {}), "roberta": ("base", {}), "xlm-roberta": ("base", {}), "albert": ("base", {}),
    "electra": ("base", {}), "mobilebert": ("base", {}), "distilbert": ("base", {"dim": 64, "hidden_dim": 128,
                                                                                  "n_layers": 2, "n_heads": 4}),
    "gpt2": ("lm", {}), "gpt_neo": ("lm", {"num_layers": 2, "attention_types": [[["global", "local"], 1]]}),
    "gptj": ("lm", {"rotary_dim": 8}), "codegen": ("lm", {"rotary_dim": 8}), "gpt_neox": ("lm", {}),
    "opt": ("lm", {"ffn_dim": 128, "word_embed_proj_dim": 64}), "bloom": ("lm", {"n_head": 4}),
    "falcon": ("lm", {"new_decoder_architecture": False, "multi_query": False, "ffn_hidden_size": 128}),
    "falcon+mqa": ("lm", {"new_decoder_architecture": False, "multi_query": True, "ffn_hidden_size": 128}),
    "gpt_bigcode": ("lm", {"multi_query": True}),
    "llama": ("lm", {}), "mistral": ("lm", {}), "qwen2": ("lm", {}), "qwen3": ("lm", {}), "gemma": ("lm", {}),
    "gemma2": ("lm", {}), "phi": ("lm", {}), "phi3": ("lm", {"pad_token_id": 0}), "stablelm": ("lm", {}),
    "starcoder2": ("lm", {}), "olmo": ("lm", {}), "granite": ("lm", {}),
    "t5": ("seq2seq", {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
                       "d_kv": 16}),
    "bart": ("seq2seq", {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                         "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}),
    "vit": ("image", {}), "deit": ("image", {}), "beit": ("image", {}), "dinov2": ("image", {}),
    "swin": ("image", {"embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4], "window_size": 2}),
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "vocab_size": 256, "num_key_value_heads": 2, "max_position_embeddings": 256, "use_cache": False,
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256, "num_kv_heads": 4}


def build(kind: str, task: str, extra: dict):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kind.split("+")[0], **extra)  # "family+variant": a second config of one family
    for key, value in TINY.items():
        if hasattr(cfg, key) or key in getattr(cfg, "attribute_map", {}):
            try:
                setattr(cfg, key, value)
            except AttributeError:  # a read-only property of this family
                pass
    if getattr(cfg, "head_dim", None) is not None:
        try:
            cfg.head_dim = 16
        except AttributeError:
            pass
    for key, value in extra.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = "eager"
    if task == "lm":
        return AutoModelForCausalLM.from_config(cfg).eval(), ["logits"]
    if task == "seq2seq":
        return AutoModelForSeq2SeqLM.from_config(cfg).eval(), ["logits"]
    if task == "image":
        for key, value in {"image_size": 32, "patch_size": 8, "num_labels": 10}.items():
            setattr(cfg, key, value)
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

        cls = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(cfg)]
        return (cls[0] if isinstance(cls, tuple) else cls)(cfg).eval(), ["logits"]
    return AutoModel.from_config(cfg).eval(), ["last_hidden_state"]


def export(kind: str, exporter: str, path: Path) -> None:
    import onnx
    import torch

    task, extra = ARCHS[kind]
    model, outputs = build(kind, task, extra)

    wrapped = _wrapper(model, task if task in ("image", "seq2seq") else "text", outputs)
    if task == "image":
        args, names = (torch.randn(2, 3, 32, 32),), ["pixel_values"]
    else:
        args, names = (torch.randint(0, 256, (2, 16)), torch.ones(2, 16, dtype=torch.long)), ["input_ids",
                                                                                             "attention_mask"]
        if task == "seq2seq":
            args, names = args + (torch.randint(0, 256, (2, 12)),), names + ["decoder_input_ids"]
    dims = ["batch"] if task == "image" else ["batch", "sequence"]
    with tempfile.TemporaryDirectory() as tmp:
        raw = str(Path(tmp) / "raw.onnx")
        if exporter == "ts":
            axes = {n: dict(enumerate(dims if n != "decoder_input_ids" else ["batch", "target"])) for n in names}
            axes.update({n: dict(enumerate(dims if task != "seq2seq" else ["batch", "target"])) for n in outputs})
            torch.onnx.export(wrapped, args, raw, input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        else:
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=128)
            shapes = [{0: batch}] if task == "image" else [{0: batch, 1: seq}, {0: batch, 1: seq}]
            if task == "seq2seq":
                shapes.append({0: batch, 1: torch.export.Dim("target", min=2, max=128)})
            program = torch.onnx.export(wrapped, args, input_names=names, output_names=outputs,
                                        dynamic_shapes=tuple(shapes), opset_version=18, dynamo=True,
                                        external_data=False)
            program.save(raw)
        model_proto = onnx.load(raw)
        model_proto.ir_version = 8
        onnx.save(model_proto, str(path))


def feeds(model, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = [i.name for i in model.graph.input]
    if names == ["pixel_values"]:
        return {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - seq // 4:] = 0
    out = {"input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64), "attention_mask": mask,
           "decoder_input_ids": rng.integers(0, 256, (batch, seq + 3)).astype(np.int64)}
    return {k: v for k, v in out.items() if k in names}


def check(path: Path) -> dict:
    import onnx
    import onnxruntime as ort

    import onnxprune
    sys.path.insert(0, str(HERE.parent))
    from tests.oracle import list_groups, masked_and_removed, random_choice, relative_error

    def run(model, feed):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)

    model = onnx.load(str(path))
    image = [i.name for i in model.graph.input] == ["pixel_values"]
    shapes = [(1, 0), (2, 0)] if image else SHAPES
    groups = list_groups(model)
    heads = [g for g in groups if "Softmax" in g["ops"] and (g["prunable"] or g["channels"]) <= 16]
    # other frozen groups that are not the residual stream or the logits: the attention path
    attention = [g for g in groups if not g["prunable"] and g not in heads and g["frozen"]
                 and not any(w in r for r in g["frozen"] for w in ("normaliz", "graph output", "embedding lookup"))]
    row = {"head_groups": sum(1 for g in heads if g["prunable"]), "other_frozen": sum(
        1 for g in heads if not g["prunable"]) + len(attention), "mlp_groups": sum(
        1 for g in groups if g["prunable"] >= 64),
        "frozen_heads_because": sorted({g["frozen"][0][:160] for g in heads + attention
                                        if not g["prunable"] and g["frozen"]})}
    choice = random_choice(model, 0.5, 0)
    masked, removed = masked_and_removed(model, choice)
    onnx.checker.check_model(removed, full_check=True)
    row["oracle_rel_l2"] = max(relative_error(run(masked, feeds(model, b, s)), run(removed, feeds(model, b, s)))
                               for b, s in shapes)
    pruned, result = onnxprune.prune(model, structured=True, sparsity=0.5, head_sparsity=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    details = result.passes[0].details
    row["groups_before_after"] = [(g["channels_before"], g["channels_after"]) for g in details["groups"]]
    row["macs_kept"] = round(details["macs_after"] / details["macs_before"], 3)
    for b, s in shapes:
        want, got = run(model, feeds(model, b, s)), run(pruned, feeds(model, b, s))
        assert [w.shape for w in want] == [g.shape for g in got], "output shapes differ"
        assert all(np.isfinite(g).all() for g in got), "non-finite outputs"
    row["runs"] = True
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated families (default: all)")
    parser.add_argument("--exporter", default="ts,dynamo")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in (args.only.split(",") if args.only else ARCHS):
        for exporter in args.exporter.split(","):
            path = OUT / f"{kind}_{exporter}.onnx"
            row: dict = {"model": f"{kind} ({exporter})"}
            start = time.perf_counter()
            try:
                if not path.exists():
                    export(kind, exporter, path)
            except Exception as exc:  # noqa: BLE001 - an exporter limit is a row, not a crash
                row["export_failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            try:
                row.update(check(path))
            except Exception as exc:  # noqa: BLE001 - reported per model
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | head groups | MLP groups | other frozen groups | oracle rel. L2 | heads/neurons before -> after "
          "| MACs kept | why the other groups stay |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "export_failed" in r or "error" in r:
            print(f"| {r['model']} | | | | | | | {r.get('export_failed') and 'export failed: ' + r['export_failed'] or 'ERROR: ' + r['error'][:120]} |")
            continue
        pairs = ", ".join(f"{a}->{b}" for a, b in r["groups_before_after"])
        note = "; ".join(r["frozen_heads_because"])[:200]
        print(f"| {r['model']} | {r['head_groups']} | {r['mlp_groups']} | {r['other_frozen']} | "
              f"{r['oracle_rel_l2']:.1e} | {pairs} | {r['macs_kept']} | {note} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
