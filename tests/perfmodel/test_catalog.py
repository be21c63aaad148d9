import json

import pytest
from servegym.perfmodel.catalog import CatalogError, get_gpu, get_model, model_from_hf_config, register_catalog

# Parameter counts and KV bytes per token derived from each model's config.json (shared model table).
REFERENCE = {
    "Llama-2-7B": (6.738e9, 524288),
    "Llama-2-70B": (68.977e9, 327680),
    "Llama-3-8B": (8.03e9, 131072),
    "Qwen2.5-72B": (72.706e9, 327680),
    "Mixtral-8x7B": (46.703e9, 131072),
}


@pytest.mark.parametrize("name", ["H100-SXM", "h100-sxm", " A100-80GB ", "l40s", "MI300X"])
def test_gpu_lookup_is_case_insensitive(name):
    assert get_gpu(name).name.lower() == name.strip().lower()


@pytest.mark.parametrize("alias", ["Mistral-7B", "mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1"])
def test_model_answers_to_its_aliases(alias):
    assert get_model(alias).name == "Mistral-7B"


@pytest.mark.parametrize(("name", "expected"), REFERENCE.items())
def test_parameter_count_and_kv_bytes_match_the_configs(name, expected):
    params, kv_bytes = expected
    spec = get_model(name)
    assert spec.num_params == pytest.approx(params, rel=1e-3)
    assert spec.kv_bytes_per_token("bf16") == kv_bytes
    assert spec.kv_bytes_per_token("fp8") == kv_bytes // 2


def test_unknown_names_are_named_in_the_error():
    with pytest.raises(CatalogError, match="unknown GPU 'H900'"):
        get_gpu("H900")
    with pytest.raises(CatalogError, match="unknown model 'Llama-9B'"):
        get_model("Llama-9B")


def test_fp8_needs_hardware_support():
    assert get_gpu("H100-SXM").peak_flops("fp8") == 2 * get_gpu("H100-SXM").peak_flops("bf16")
    with pytest.raises(CatalogError, match="no FP8"):
        get_gpu("A100-80GB").peak_flops("fp8")


def _qwen2_config(path):
    config = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    path.write_text(json.dumps(config))
    return path


def test_hugging_face_config_json_becomes_a_model(tmp_path):
    spec = model_from_hf_config(_qwen2_config(tmp_path / "config.json"), name="Qwen2-0.5B")
    assert (spec.head_dim, spec.num_key_value_heads, spec.gated_mlp) == (64, 2, True)
    assert spec.num_params == pytest.approx(0.494e9, rel=0.01)  # the published size of Qwen2-0.5B
    assert get_model(str(tmp_path / "config.json")).hidden_size == 896


def test_user_yaml_adds_gpus_and_models(tmp_path):
    _qwen2_config(tmp_path / "config.json")
    (tmp_path / "catalog.yaml").write_text(
        "gpus:\n  - {name: RTX-4090, family: ada, memory_gb: 24, mem_bandwidth_gbps: 1008, bf16_dense_tflops: 165}\n"
        "models:\n  - {name: My-Qwen, config: config.json}\n"
    )
    assert register_catalog(tmp_path / "catalog.yaml") == ["RTX-4090", "My-Qwen"]
    assert get_gpu("rtx-4090").bandwidth == 1008e9
    assert get_model("my-qwen").num_hidden_layers == 24


def test_malformed_user_entries_are_rejected_with_their_place(tmp_path):
    (tmp_path / "bad.yaml").write_text("gpus:\n  - {name: X, family: ada, memory_gb: lots}\n")
    with pytest.raises(CatalogError, match=r"bad.yaml gpus\[0\]: field 'memory_gb' has bad value 'lots'"):
        register_catalog(tmp_path / "bad.yaml")
