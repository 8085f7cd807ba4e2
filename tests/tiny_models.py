"""Tiny ONNX models with the node names optimum gives Llama and BERT exports, built with onnx.helper.

Fast, deterministic stand-ins for the real exports in unit tests of targets, calibration and
rewrite. They are not real transformers (attention is replaced by elementwise mixing), but the
target MatMuls, shared inputs, biases (one deduplicated through Identity, as exporters do), GELU /
SiLU activations and the decoder's past_key_values inputs are laid out as in the real exports. Also
one MatMulNBits over random codes (:func:`make_matmul_nbits`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have not "
    "function module class value return object list string file python data type error code name "
    "lord god said unto thee thy thou shall king people house land children israel son day"
).split()


def make_texts(folder: Path, n_words: int = 30000, seed: int = 0) -> dict[str, Path]:
    """Synthetic corpora (Zipf-like word frequencies) as .txt and .jsonl."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    p /= p.sum()
    out = {}
    for name, s in (("calib", seed), ("eval", seed + 1)):
        r = np.random.default_rng(s)
        words = r.choice(WORDS, size=n_words, p=p)
        lines = [" ".join(words[i : i + 12]) + "." for i in range(0, n_words, 12)]
        path = folder / f"{name}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[name] = path
    jl = folder / "calib.jsonl"
    with jl.open("w", encoding="utf-8") as f:
        text = out["calib"].read_text().splitlines()
        for i in range(0, len(text), 20):
            f.write(json.dumps({"text": "\n".join(text[i : i + 20]), "id": i}) + "\n")
    out["jsonl"] = jl
    del rng
    return out


def write_tokenizer(folder: Path, bert: bool) -> Path:
    """A word-level tokenizer.json over WORDS (+ '.'), with [CLS]/[SEP] added for BERT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + ["."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if not bert else pre_tokenizers.BertPreTokenizer()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


VOCAB = len(set(WORDS)) + 4


def _w(rng, *shape, scale=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(shape[0])
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_decoder(path: Path, layers: int = 2, hidden: int = 16, inter: int = 48, kv: int = 8, seed: int = 0,
                 external: bool = False) -> Path:
    """Llama-like decoder as optimum names it: inputs input_ids, attention_mask, position_ids and
    past_key_values.*; output logits (through /lm_head/MatMul)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_w(rng, VOCAB, hidden, scale=1.0), "model.embed_tokens.weight"),
        numpy_helper.from_array(_w(rng, 512, hidden, scale=0.3), "model.pos.weight"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
    ]
    nodes = [
        helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["/model/embed_tokens/Gather_output_0"], name="/model/embed_tokens/Gather"),
        helper.make_node("Gather", ["model.pos.weight", "position_ids"], ["/model/pos/Gather_output_0"], name="/model/pos/Gather"),
        helper.make_node("Add", ["/model/embed_tokens/Gather_output_0", "/model/pos/Gather_output_0"], ["h0"], name="/model/Add"),
        helper.make_node("Unsqueeze", ["attention_mask", "axes_last"], ["mask_u"], name="/model/Unsqueeze"),
        helper.make_node("Cast", ["mask_u"], ["mask_f"], to=TensorProto.FLOAT, name="/model/Cast"),
        helper.make_node("Mul", ["h0", "mask_f"], ["h_0"], name="/model/Mul"),
    ]
    h = "h_0"
    for i in range(layers):
        p = f"/model/layers.{i}"
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), f"model.layers.{i}.input_layernorm.weight"))
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), f"model.layers.{i}.post_attention_layernorm.weight"))
        n1 = f"{p}/input_layernorm/Mul_1_output_0"
        nodes.append(helper.make_node("Mul", [h, f"model.layers.{i}.input_layernorm.weight"], [n1], name=f"{p}/input_layernorm/Mul_1"))
        for proj, n in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            wname = f"onnx::MatMul_{100 * i + len(inits)}"
            inits.append(numpy_helper.from_array(_w(rng, hidden, n), wname))
            nodes.append(helper.make_node("MatMul", [n1, wname], [f"{p}/self_attn/{proj}/MatMul_output_0"], name=f"{p}/self_attn/{proj}/MatMul"))
        a = f"{p}/self_attn"
        nodes += [
            helper.make_node("Tanh", [f"{a}/q_proj/MatMul_output_0"], [f"{a}/Tanh_output_0"], name=f"{a}/Tanh"),
            helper.make_node("Mul", [f"{a}/k_proj/MatMul_output_0", f"{a}/v_proj/MatMul_output_0"], [f"{a}/Mul_output_0"], name=f"{a}/Mul"),
            helper.make_node("Concat", [f"{a}/Mul_output_0", f"{a}/v_proj/MatMul_output_0"], [f"{a}/Concat_output_0"], axis=-1, name=f"{a}/Concat"),
            helper.make_node("Add", [f"{a}/Tanh_output_0", f"{a}/Concat_output_0"], [f"{a}/Reshape_7_output_0"], name=f"{a}/Reshape_7"),
        ]
        wo = f"onnx::MatMul_{100 * i + len(inits)}"
        inits.append(numpy_helper.from_array(_w(rng, hidden, hidden), wo))
        nodes.append(helper.make_node("MatMul", [f"{a}/Reshape_7_output_0", wo], [f"{a}/o_proj/MatMul_output_0"], name=f"{a}/o_proj/MatMul"))
        nodes.append(helper.make_node("Add", [h, f"{a}/o_proj/MatMul_output_0"], [f"{p}/Add_output_0"], name=f"{p}/Add"))
        n2 = f"{p}/post_attention_layernorm/Mul_1_output_0"
        nodes.append(helper.make_node("Mul", [f"{p}/Add_output_0", f"model.layers.{i}.post_attention_layernorm.weight"], [n2], name=f"{p}/post_attention_layernorm/Mul_1"))
        m = f"{p}/mlp"
        for proj in ("gate_proj", "up_proj"):
            wname = f"onnx::MatMul_{100 * i + len(inits)}"
            inits.append(numpy_helper.from_array(_w(rng, hidden, inter), wname))
            nodes.append(helper.make_node("MatMul", [n2, wname], [f"{m}/{proj}/MatMul_output_0"], name=f"{m}/{proj}/MatMul"))
        nodes += [
            helper.make_node("Sigmoid", [f"{m}/gate_proj/MatMul_output_0"], [f"{m}/act_fn/Sigmoid_output_0"], name=f"{m}/act_fn/Sigmoid"),
            helper.make_node("Mul", [f"{m}/gate_proj/MatMul_output_0", f"{m}/act_fn/Sigmoid_output_0"], [f"{m}/act_fn/Mul_output_0"], name=f"{m}/act_fn/Mul"),
            helper.make_node("Mul", [f"{m}/act_fn/Mul_output_0", f"{m}/up_proj/MatMul_output_0"], [f"{m}/Mul_output_0"], name=f"{m}/Mul"),
        ]
        wd = f"onnx::MatMul_{100 * i + len(inits)}"
        inits.append(numpy_helper.from_array(_w(rng, inter, hidden), wd))
        nodes.append(helper.make_node("MatMul", [f"{m}/Mul_output_0", wd], [f"{m}/down_proj/MatMul_output_0"], name=f"{m}/down_proj/MatMul"))
        h_next = f"{p}/Add_1_output_0"
        nodes.append(helper.make_node("Add", [f"{p}/Add_output_0", f"{m}/down_proj/MatMul_output_0"], [h_next], name=f"{p}/Add_1"))
        h = h_next
    inits.append(numpy_helper.from_array(_w(rng, hidden, VOCAB), "lm_head.weight"))
    nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="/lm_head/MatMul"))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    for i in range(layers):
        for kvn in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kvn}", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 4]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB])]
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10, producer_name="tiny-test")
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + "_data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    write_tokenizer(path.parent, bert=False)
    return path


def make_encoder(path: Path, layers: int = 2, hidden: int = 16, inter: int = 64, seed: int = 1) -> Path:
    """BERT-like encoder as optimum names it: MatMul + Add(bias, ...) per dense layer, exact-erf GELU,
    LayerNormalization; output last_hidden_state. One bias is deduplicated through an Identity."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_w(rng, VOCAB, hidden, scale=1.0), "embeddings.word_embeddings.weight"),
        numpy_helper.from_array(_w(rng, 2, hidden, scale=0.1), "embeddings.token_type_embeddings.weight"),
        numpy_helper.from_array(np.ones(hidden, np.float32), "ln.weight"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "ln.bias"),
        numpy_helper.from_array(np.array(1 / math.sqrt(2), np.float32), "c_rsqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "c_one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "c_half"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
    ]
    nodes = [
        helper.make_node("Gather", ["embeddings.word_embeddings.weight", "input_ids"], ["e_w"], name="/embeddings/word_embeddings/Gather"),
        helper.make_node("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"], ["e_t"], name="/embeddings/token_type_embeddings/Gather"),
        helper.make_node("Add", ["e_w", "e_t"], ["e"], name="/embeddings/Add"),
        helper.make_node("Unsqueeze", ["attention_mask", "axes_last"], ["mask_u"], name="/Unsqueeze"),
        helper.make_node("Cast", ["mask_u"], ["mask_f"], to=TensorProto.FLOAT, name="/Cast"),
        helper.make_node("Mul", ["e", "mask_f"], ["e_m"], name="/embeddings/Mul"),
        helper.make_node("LayerNormalization", ["e_m", "ln.weight", "ln.bias"], ["/embeddings/LayerNorm/LayerNormalization_output_0"], axis=-1, name="/embeddings/LayerNorm/LayerNormalization"),
    ]
    h = "/embeddings/LayerNorm/LayerNormalization_output_0"

    def dense(prefix: str, x: str, k: int, n: int, bias_name: str | None = None) -> str:
        wname = f"onnx::MatMul_{len(inits)}"
        inits.append(numpy_helper.from_array(_w(rng, k, n), wname))
        bname = prefix.strip("/").replace("/", ".") + ".bias"
        if bias_name is None:
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(n)).astype(np.float32), bname))
        else:  # deduplicated bias: Identity of another initializer, as torch.onnx exports do
            nodes.append(helper.make_node("Identity", [bias_name], [bname], name=f"Identity_{len(nodes)}"))
        nodes.append(helper.make_node("MatMul", [x, wname], [f"{prefix}/MatMul_output_0"], name=f"{prefix}/MatMul"))
        nodes.append(helper.make_node("Add", [bname, f"{prefix}/MatMul_output_0"], [f"{prefix}/Add_output_0"], name=f"{prefix}/Add"))
        return f"{prefix}/Add_output_0"

    for i in range(layers):
        p = f"/encoder/layer.{i}"
        q = dense(f"{p}/attention/self/query", h, hidden, hidden)
        k = dense(f"{p}/attention/self/key", h, hidden, hidden)
        v = dense(f"{p}/attention/self/value", h, hidden, hidden, bias_name="ln.bias" if i == 0 else None)
        s = f"{p}/attention/self"
        nodes += [
            helper.make_node("Tanh", [q], [f"{s}/Tanh_output_0"], name=f"{s}/Tanh"),
            helper.make_node("Mul", [f"{s}/Tanh_output_0", k], [f"{s}/Mul_output_0"], name=f"{s}/Mul"),
            helper.make_node("Add", [f"{s}/Mul_output_0", v], [f"{s}/Reshape_3_output_0"], name=f"{s}/Reshape_3"),
        ]
        o = dense(f"{p}/attention/output/dense", f"{s}/Reshape_3_output_0", hidden, hidden)
        nodes.append(helper.make_node("Add", [o, h], [f"{p}/attention/output/Add_output_0"], name=f"{p}/attention/output/Add"))
        ln1 = f"{p}/attention/output/LayerNorm/LayerNormalization_output_0"
        nodes.append(helper.make_node("LayerNormalization", [f"{p}/attention/output/Add_output_0", "ln.weight", "ln.bias"], [ln1], axis=-1, name=f"{p}/attention/output/LayerNorm/LayerNormalization"))
        it = dense(f"{p}/intermediate/dense", ln1, hidden, inter)
        g = f"{p}/intermediate/intermediate_act_fn"
        nodes += [
            helper.make_node("Mul", [it, "c_rsqrt2"], [f"{g}/Div_output_0"], name=f"{g}/Div"),
            helper.make_node("Erf", [f"{g}/Div_output_0"], [f"{g}/Erf_output_0"], name=f"{g}/Erf"),
            helper.make_node("Add", [f"{g}/Erf_output_0", "c_one"], [f"{g}/Add_output_0"], name=f"{g}/Add"),
            helper.make_node("Mul", [it, f"{g}/Add_output_0"], [f"{g}/Mul_output_0"], name=f"{g}/Mul"),
            helper.make_node("Mul", [f"{g}/Mul_output_0", "c_half"], [f"{g}/Mul_1_output_0"], name=f"{g}/Mul_1"),
        ]
        out = dense(f"{p}/output/dense", f"{g}/Mul_1_output_0", inter, hidden)
        nodes.append(helper.make_node("Add", [out, ln1], [f"{p}/output/Add_output_0"], name=f"{p}/output/Add"))
        h_next = f"{p}/output/LayerNorm/LayerNormalization_output_0"
        nodes.append(helper.make_node("LayerNormalization", [f"{p}/output/Add_output_0", "ln.weight", "ln.bias"], [h_next], axis=-1, name=f"{p}/output/LayerNorm/LayerNormalization"))
        h = h_next
    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="/Identity_out"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden])]
    model = helper.make_model(helper.make_graph(nodes, "main_graph", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10, producer_name="tiny-test")
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    write_tokenizer(path.parent, bert=True)
    return path


def make_no_targets(path: Path) -> Path:
    """A valid model whose only MatMul multiplies two activations (no target)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"], name="mm")], "g", [x], [y])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def make_matmul_nbits(path: Path, *, bits: int = 4, g_idx: bool = False, bias: bool = False, zero_points: bool = True,
                      k: int = 64, n: int = 48, block: int = 32, seed: int = 0,
                      accuracy_level: int | None = None, dtype=np.float32) -> Path:
    """One MatMulNBits (named as an up projection) over random codes, built with onnx.helper
    (``accuracy_level``: the attribute, absent when None; ``dtype``: A's, the scales' and the bias')."""
    rng = np.random.default_rng(seed)
    kb = -(-k // block)
    blob = block * bits // 8
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, kb, blob), dtype=np.uint8), "W_q"),
             numpy_helper.from_array((rng.random(n * kb) * 0.1 + 0.01).astype(dtype), "W_scales")]
    inputs = ["X", "W_q", "W_scales", "", "", ""]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * -(-kb * bits // 8), dtype=np.uint8), "W_zp"))
        inputs[3] = "W_zp"
    if g_idx:
        inits.append(numpy_helper.from_array((np.arange(k) // block).astype(np.int32), "W_g_idx"))
        inputs[4] = "W_g_idx"
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(dtype), "W_bias"))
        inputs[5] = "W_bias"
    while not inputs[-1]:
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, ["Y"], name="/model/layers.0/mlp/up_proj/MatMul_Q4",
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                            **({} if accuracy_level is None else {"accuracy_level": accuracy_level}))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", elem, ["batch", k])],
                              [helper.make_tensor_value_info("Y", elem, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.save(model, str(path))
    return path
