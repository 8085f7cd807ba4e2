import onnx
import onnx_ir as ir
import pytest

from scap_onnx.errors import ScapError
from scap_onnx.graph.targets import GraphView, find_all_targets, find_targets, group_sites, layer_of, role_of, select_targets

# Names as optimum / torch.onnx exports and transformers module paths give them, per family.
NAMES = {
    # Llama / Mistral / Qwen2 / Gemma (node names and dynamo-style weight names)
    "/model/layers.0/self_attn/q_proj/MatMul": ("q", 0),
    "/model/layers.11/self_attn/k_proj/MatMul": ("k", 11),
    "/model/layers.2/self_attn/v_proj/MatMul": ("v", 2),
    "/model/layers.3/self_attn/o_proj/MatMul": ("o", 3),
    "/model/layers.4/mlp/gate_proj/MatMul": ("gate", 4),
    "/model/layers.5/mlp/up_proj/MatMul": ("up", 5),
    "/model/layers.6/mlp/down_proj/MatMul": ("down", 6),
    "model.layers.7.mlp.down_proj.weight": ("down", 7),
    "/lm_head/MatMul": ("lm_head", None),
    # BERT / MiniLM
    "/encoder/layer.0/attention/self/query/MatMul": ("q", 0),
    "/encoder/layer.1/attention/self/key/MatMul": ("k", 1),
    "/encoder/layer.2/attention/self/value/MatMul": ("v", 2),
    "/encoder/layer.3/attention/output/dense/MatMul": ("o", 3),
    "/encoder/layer.4/intermediate/dense/MatMul": ("up", 4),
    "/encoder/layer.5/output/dense/MatMul": ("down", 5),
    "/pooler/dense/MatMul": ("other", None),
    # GPT-2
    "/transformer/h.0/attn/c_attn/MatMul": ("qkv", 0),
    "/transformer/h.1/attn/c_proj/MatMul": ("o", 1),
    "/transformer/h.2/mlp/c_fc/MatMul": ("up", 2),
    "/transformer/h.3/mlp/c_proj/MatMul": ("down", 3),
    # Falcon / GPT-NeoX / BLOOM
    "/transformer/h.0/self_attention/query_key_value/MatMul": ("qkv", 0),
    "/transformer/h.0/self_attention/dense/MatMul": ("o", 0),
    "/transformer/h.0/mlp/dense_h_to_4h/MatMul": ("up", 0),
    "/transformer/h.0/mlp/dense_4h_to_h/MatMul": ("down", 0),
    "/gpt_neox/layers.2/attention/dense/MatMul": ("o", 2),
    "/embed_out/MatMul": ("lm_head", None),
    # Phi-2 / Phi-3
    "/model/layers.0/self_attn/dense/MatMul": ("o", 0),
    "/model/layers.0/mlp/fc1/MatMul": ("up", 0),
    "/model/layers.0/mlp/fc2/MatMul": ("down", 0),
    "/model/layers.0/self_attn/qkv_proj/MatMul": ("qkv", 0),
    "/model/layers.0/mlp/gate_up_proj/MatMul": ("gate_up", 0),
    # Mixtral experts; the router 'gate' is not a gate projection (Qwen-MoE calls it mlp.gate)
    "/model/layers.1/block_sparse_moe/experts.3/w1/MatMul": ("gate", 1),
    "/model/layers.1/block_sparse_moe/experts.3/w3/MatMul": ("up", 1),
    "/model/layers.1/block_sparse_moe/experts.3/w2/MatMul": ("down", 1),
    "/model/layers.1/block_sparse_moe/gate/MatMul": ("router", 1),
    "/model/layers.2/mlp/gate/MatMul": ("router", 2),
    "/model/layers.2/mlp/shared_expert_gate/MatMul": ("router", 2),
    # GPT-2 Conv1D and OPT, as optimum exports them: Gemm
    "/transformer/h.0/attn/c_attn/Gemm": ("qkv", 0),
    "/transformer/h.0/mlp/c_proj/Gemm": ("down", 0),
    "/decoder/layers.1/fc1/Gemm": ("up", 1),
    # T5
    "/encoder/block.0/layer.0/SelfAttention/q/MatMul": ("q", 0),
    "/encoder/block.0/layer.0/SelfAttention/o/MatMul": ("o", 0),
    "/encoder/block.0/layer.1/DenseReluDense/wi/MatMul": ("up", 0),
    "/encoder/block.0/layer.1/DenseReluDense/wo/MatMul": ("down", 0),
    # DistilBERT
    "/transformer/layer.0/attention/q_lin/MatMul": ("q", 0),
    "/transformer/layer.0/attention/out_lin/MatMul": ("o", 0),
    "/transformer/layer.0/ffn/lin1/MatMul": ("up", 0),
    "/transformer/layer.0/ffn/lin2/MatMul": ("down", 0),
    # anonymous
    "node_MatMul_42": ("other", None),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_roles_and_layers_from_exporter_names(name):
    role, layer = NAMES[name]
    assert (role_of(name) or "other") == role
    assert layer_of(name) == layer


def _proto(path):
    return onnx.load(str(path), load_external_data=False)


def test_decoder_targets(tiny):
    ts = find_targets(_proto(tiny["decoder"]))
    assert len(ts) == 14  # 2 layers x 7, lm_head excluded
    assert {t.role for t in ts} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(t.bias is None for t in ts)
    down = [t for t in ts if t.role == "down"][0]
    assert (down.k, down.n, down.layer) == (48, 16, 0)
    sites = group_sites(ts)
    assert len(sites) == 8  # per layer: qkv input, o input, gate/up input, down input
    assert [s.roles for s in sites[:4]] == [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]


def test_lm_head_only_on_request(tiny):
    all_t = find_all_targets(GraphView.from_proto(_proto(tiny["decoder"])))
    assert any(t.role == "lm_head" for t in all_t)
    assert [t.role for t in select_targets(all_t, "lm_head")] == ["lm_head"]
    assert len(select_targets(all_t, "*")) == 15


def test_target_patterns(tiny):
    all_t = find_all_targets(GraphView.from_proto(_proto(tiny["decoder"])))
    assert {t.role for t in select_targets(all_t, "down,up")} == {"down", "up"}
    assert len(select_targets(all_t, "*layers.1/*")) == 7
    assert len(select_targets(all_t, "!*layers.0/*")) == 7  # exclusion from the default set
    assert len(select_targets(all_t, "*mlp*,!down")) == 4


def test_encoder_biases_fused_through_identity(tiny):
    ts = find_targets(_proto(tiny["encoder"]))
    assert len(ts) == 12 and all(t.bias for t in ts)
    v0 = [t for t in ts if t.role == "v" and t.layer == 0][0]
    assert v0.bias == "ln.bias"  # an Identity of ln.bias in the graph
    assert v0.bias_add.endswith("/value/Add")


def test_ir_and_proto_views_agree(tiny):
    for key in ("decoder", "encoder", "decoder_ext"):
        a = find_targets(_proto(tiny[key]))
        b = find_targets(ir.load(str(tiny[key])))
        assert a == b


def test_no_targets_is_an_error(tiny):
    with pytest.raises(ScapError, match="no target MatMuls"):
        find_targets(_proto(tiny["no_targets"]))
    with pytest.raises(ScapError, match="matches none"):
        find_targets(_proto(tiny["decoder"]), "nothing*")
