"""serve's options: flag over environment over TOML file over default, and clear errors."""

import pytest

from proxy.options import OPTIONS, OptionError, build_parser, resolve


def write_toml(tmp_path, text):
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return str(path)


def test_defaults_when_nothing_is_given():
    values = resolve([], environ={})
    assert values["port"] == 8080 and values["cache_bytes"] is None and values["model"] == []
    assert values["no_cache"] is False and values["log_format"] == "text"


def test_flag_over_env_over_file_over_default(tmp_path):
    config = write_toml(tmp_path, 'port = 7000\nmax_queue = 3\ncache-bytes = "512M"\nhost = "0.0.0.0"\n')
    env = {"MLX_CACHE_PROXY_PORT": "7100", "MLX_CACHE_PROXY_MAX_QUEUE": "4"}
    values = resolve(["--config", config, "--port", "7200"], environ=env)
    assert values["port"] == 7200  # flag
    assert values["max_queue"] == 4  # environment over file
    assert values["cache_bytes"] == 512 * 1024**2  # file (dashes accepted) over default
    assert values["host"] == "0.0.0.0"  # file
    assert values["max_tokens"] == 512  # default


def test_lists_and_switches_from_each_source(tmp_path):
    config = write_toml(tmp_path, 'model = ["a", "b"]\nno_cache = true\n')
    assert resolve(["--config", config], environ={})["model"] == ["a", "b"]
    assert resolve(["--config", config], environ={})["no_cache"] is True
    assert resolve([], environ={"MLX_CACHE_PROXY_MODEL": "x, y"})["model"] == ["x", "y"]
    assert resolve(["--model", "z"], environ={"MLX_CACHE_PROXY_MODEL": "x"})["model"] == ["z"]
    assert resolve([], environ={"MLX_CACHE_PROXY_NO_CACHE": "yes"})["no_cache"] is True
    assert resolve(["--no-cache"], environ={})["no_cache"] is True


@pytest.mark.parametrize(
    "argv, env, toml, where",
    [
        (["--port", "eighty"], {}, None, "flag --port"),
        ([], {"MLX_CACHE_PROXY_CACHE_BYTES": "lots"}, None, "MLX_CACHE_PROXY_CACHE_BYTES"),
        ([], {}, "max_queue = -1\n", "key max_queue"),
        ([], {}, "log_format = \"xml\"\n", "key log_format"),
        ([], {}, "port = true\n", "key port"),
        ([], {"MLX_CACHE_PROXY_NO_CACHE": "maybe"}, None, "MLX_CACHE_PROXY_NO_CACHE"),
        (["--max-batch", "0"], {}, None, "flag --max-batch"),
        ([], {"MLX_CACHE_PROXY_MAX_BATCH": "eight"}, None, "MLX_CACHE_PROXY_MAX_BATCH"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_source(tmp_path, argv, env, toml, where):
    if toml is not None:
        argv = argv + ["--config", write_toml(tmp_path, toml)]
    with pytest.raises(OptionError, match=where):
        resolve(argv, environ=env)


def test_an_unknown_or_broken_config_file_is_an_error(tmp_path):
    with pytest.raises(OptionError, match="unknown option"):
        resolve(["--config", write_toml(tmp_path, "prot = 1\n")], environ={})
    with pytest.raises(OptionError, match="not valid TOML"):
        resolve(["--config", write_toml(tmp_path, "port = = 1\n")], environ={})
    with pytest.raises(OptionError, match="cannot read"):
        resolve(["--config", str(tmp_path / "missing.toml")], environ={})


def test_help_documents_every_option_and_its_variable():
    text = build_parser().format_help()
    for option in OPTIONS:
        assert option.dashed in text and option.env in text


def test_max_batch_from_each_source_and_the_default_is_the_workers(tmp_path):
    from worker.main import DEFAULT_MAX_BATCH

    config = write_toml(tmp_path, "max-batch = 2\n")
    assert resolve(["--config", config], environ={})["max_batch"] == 2
    assert resolve(["--config", config], environ={"MLX_CACHE_PROXY_MAX_BATCH": "4"})["max_batch"] == 4
    assert resolve(["--max-batch", "1"], environ={"MLX_CACHE_PROXY_MAX_BATCH": "4"})["max_batch"] == 1
    # Nothing given: nothing forwarded, so the worker's own default is the only one.
    assert resolve([], environ={})["max_batch"] is None
    help_text = " ".join(build_parser().format_help().split())
    assert f"(worker default: {DEFAULT_MAX_BATCH})" in help_text


def test_reasoning_field_is_both_unless_one_is_picked():
    from proxy.serve import config_from_options

    assert config_from_options(resolve([], environ={})).reasoning_field == "both"
    picked = resolve(["--reasoning-field", "reasoning"], environ={})
    assert config_from_options(picked).reasoning_field == "reasoning"
    assert resolve([], environ={"MLX_CACHE_PROXY_REASONING_FIELD": "reasoning_content"})["reasoning_field"] == "reasoning_content"
    with pytest.raises(OptionError, match="reasoning_field"):
        resolve(["--reasoning-field", "thoughts"], environ={})
