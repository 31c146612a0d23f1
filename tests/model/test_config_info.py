"""ModelConfig I/O in both key styles, presets, and `nanoseek info` (issue test 5)."""

import json
import subprocess
import sys

import pytest
import torch

from nanoseek import PRESETS, ModelConfig
from nanoseek.model.info import describe


def test_official_flash_config_reads_like_the_preset(shared_reference):
    cfg = ModelConfig.from_json(shared_reference / "deepseek-v4-flash.config.json")
    preset = ModelConfig.from_preset("flash")
    for field in ("layer_types", "mlp_layer_types", "hidden_size", "num_hidden_layers", "qk_rope_head_dim",
                  "index_topk", "n_routed_experts", "routed_scaling_factor", "compress_rope_theta"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.mtp_layer_types == ["sliding_attention"]
    assert cfg.yarn["factor"] == 16 and cfg.yarn["original_max_position_embeddings"] == 65536
    assert cfg.extra["quantization_config"]["quant_method"] == "fp8"


def test_config_json_round_trip_both_styles():
    cfg = ModelConfig.from_preset("small")
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    # transformers style only
    hf_style = {k: v for k, v in d.items() if k not in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim",
                                                         "rope_scaling")}
    hf_style["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": 10000.0},
        "compress": {"rope_type": "yarn", "rope_theta": 160000.0, **{k: v for k, v in cfg.rope_scaling.items()
                                                                   if k != "type"}},
    }
    back = ModelConfig.from_dict(hf_style)
    assert back.layer_types == cfg.layer_types and back.qk_rope_head_dim == cfg.qk_rope_head_dim
    assert back.yarn["factor"] == cfg.yarn["factor"]


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_preset("tiny", layer_types=["sliding_attention"])


@pytest.mark.parametrize("bad", [{"num_hidden_layers": 10**9}, {"num_nextn_predict_layers": 10**8},
                                 {"o_groups": 0}, {"vocab_size": -5}, {"num_experts_per_tok": 0},
                                 {"hidden_size": "512"}, {"n_routed_experts": True}, {"hidden_size": 1 << 40}])
def test_hostile_sizes_are_refused_before_anything_is_built(bad):
    """A config.json is data from whoever wrote it: out-of-range or non-int sizes are a clear
    ValueError at once (10^9 layers used to build a 10^9-entry layer list, then a model on meta;
    o_groups = 0 a ZeroDivisionError)."""
    cfg = ModelConfig.from_preset("tiny").to_dict()
    cfg.update(bad)
    with pytest.raises(ValueError, match=f"invalid ModelConfig: {next(iter(bad))}="):
        ModelConfig.from_dict(cfg)


def test_hostile_config_and_index_files_are_clear_errors(tmp_path):
    """config.json and the weight index are read as data from whoever wrote them: JSON nested
    past the parser's recursion limit (json raises RecursionError, not a JSONDecodeError), a
    file too large to be one, a non-object, or a weight_map that does not map names to files is
    a ValueError naming the file, never a traceback or a read of gigabytes."""
    import json

    from nanoseek import Transformer
    from nanoseek.jsonl import read_json

    cfg = tmp_path / "config.json"
    for text, why in (('{"a": ' + "[" * 5000 + "]" * 5000 + "}", r"not valid JSON \(nested too deeply"), ("[1, 2]", "expected a JSON object"),
                      ("{oops", "not valid JSON"), (b'{"a": "\xff"}', "not valid UTF-8")):
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=rf"config\.json: {why}"):
            ModelConfig.from_json(cfg)
    cfg.write_text(json.dumps({"pad": "x" * 200}))
    with pytest.raises(ValueError, match=r"config\.json: 2\d\d bytes, more than the 100"):
        read_json(cfg, max_bytes=100)
    with pytest.raises(ValueError, match=r"nope\.json: no such file"):
        read_json(tmp_path / "nope.json")
    # a model directory whose index is hostile
    ModelConfig.from_preset("tiny").save_json(cfg)
    index = tmp_path / "model.safetensors.index.json"
    for text, why in (('{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
                      ('{"weight_map": {"a": ["x"]}}', "its weight_map must map tensor names to file names"),
                      ('{"metadata": {}}', "its weight_map must map"),
                      ('{"weight_map": {"a": "../x.safetensors"}}', "not a file of the model directory")):
        index.write_text(text)
        with pytest.raises(ValueError, match=rf"index\.json: .*{why}"):
            Transformer.from_pretrained(tmp_path)


def test_flash_and_pro_parameter_counts_match_the_release():
    flash = describe(ModelConfig.from_preset("flash"), 8192)
    assert abs(flash["parameters_total_without_mtp"] / 284e9 - 1) < 0.01
    assert round(flash["parameters_activated"] / 1e9) == 13  # the release rounds to 13B
    pro = describe(ModelConfig.from_preset("pro"), 8192)
    assert abs(pro["parameters_total_without_mtp"] / 1.6e12 - 1) < 0.02  # published as "1.6T"
    assert abs(pro["parameters_activated"] / 49e9 - 1) < 0.01


def test_small_preset_is_the_benchmark_size():
    info = describe(ModelConfig.from_preset("small"), 8192)
    assert 60e6 < info["parameters_total"] < 85e6
    assert 18e6 < info["parameters_activated"] < 30e6


def test_info_cli_flash_allocates_nothing():
    out = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", "flash", "--json"], capture_output=True,
                         text=True, check=True)
    info = json.loads(out.stdout)
    assert abs(info["parameters_total_without_mtp"] / 284e9 - 1) < 0.01
    assert info["cache_bytes_per_token"] > 0


def test_info_cli_reads_a_checkpoint(tmp_path):
    from nanoseek import Transformer

    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", str(tmp_path)], capture_output=True,
                         text=True, check=True)
    assert "parameters" in out.stdout and "B/token" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", "nonexistent-preset"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "preset" in bad.stderr


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            from nanoseek import Transformer

            Transformer(ModelConfig.from_preset(name))
