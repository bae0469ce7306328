import pytest

from conftest import EXAMPLES
from kftune.config import apply_overrides, load_config, parse_config
from kftune.errors import KftuneError
from kftune.models import PACKAGED_MODELS


def test_default_example_is_valid():
    config = load_config(EXAMPLES / "sst2-minilm-lora.yaml")
    assert config.method.name == "lora" and config.method.r == 8
    assert config.data.path.endswith("examples/data/sst2_train_16k.tsv")  # resolved next to the config file
    assert config.train.workers == 2


def test_set_overrides_nested_fields_with_yaml_types():
    config = load_config(
        EXAMPLES / "sst2-minilm-lora.yaml", ["train.lr=5e-4", "method.target_modules=[query]", "train.max_steps=7"]
    )
    assert config.train.lr == 5e-4 and config.method.target_modules == ["query"] and config.train.max_steps == 7


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", r"sst2-minilm-lora.yaml:\d+ train.lrr: unknown key"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("method.name=lorra", "method.name: unknown method 'lorra'"),
        ("method.name=head_only", "method.r: unknown key"),
        ("prompt.template=nope", "prompt.template: unknown template 'nope'"),
        ("prompt.template=alpaca", "prompt.template: template 'alpaca' is for causal_lm"),
        ("eval.metrics=[perplexity]", "eval.metrics: perplexity not available for sequence_classification"),
        ("registry.gate.metric=macro_f1", None),
        ("eval.metrics=[accuracy]", None),
        ("train.batch_size=33", "train.batch_size: 33 does not split evenly over train.workers=2"),
        ("model.task=causal_lm", "method.name|prompt.template"),
        ("cluster.train.resources.memory=lots", "cluster.train.resources.memory: String should match pattern"),
        ("cluster.train.tolerations=[{effect: Sometimes}]", "cluster.train.tolerations.0.effect: Input should be"),
        ("cluster.volume.claim=Data_Volume", "cluster.volume.claim: String should match pattern"),
        ("cluster.rayjob.nodes=0", "cluster.rayjob.nodes: Input should be greater than or equal to 1"),
    ],
)
def test_bad_fields_are_named_with_their_dotted_path(override, expected):
    if expected is None:
        load_config(EXAMPLES / "sst2-minilm-lora.yaml", [override])
        return
    with pytest.raises(KftuneError, match=expected):
        load_config(EXAMPLES / "sst2-minilm-lora.yaml", [override])


def test_gate_metric_must_be_evaluated():
    with pytest.raises(KftuneError, match=r"registry.gate.metric: 'macro_f1' is not in eval.metrics"):
        load_config(EXAMPLES / "sst2-minilm-lora.yaml", ["eval.metrics=[accuracy]", "registry.gate.metric=macro_f1"])


def test_every_cross_field_problem_is_named_at_once_with_its_line():
    overrides = ["train.batch_size=33", "eval.metrics=[accuracy]", "registry.gate.metric=macro_f1", "train.patience=2"]
    with pytest.raises(KftuneError) as refused:
        load_config(EXAMPLES / "sst2-minilm-lora.yaml", overrides)
    problems = str(refused.value).splitlines()[1:]
    assert [line.split()[1] for line in problems] == ["train.batch_size:", "train.patience:", "registry.gate.metric:"]
    assert all(line.split()[0].split("/")[-1].startswith("sst2-minilm-lora.yaml:") for line in problems), problems


def test_missing_required_sections(make_config):
    config = make_config()
    del config["registry"]
    with pytest.raises(KftuneError, match="registry: Field required"):
        parse_config(config)


def test_config_file_problems(tmp_path):
    with pytest.raises(KftuneError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(KftuneError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(KftuneError, match=r"expected key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_fingerprint_changes_with_any_field(make_config):
    a = parse_config(make_config())
    b = parse_config(make_config(train={"lr": 2e-3}))
    assert a.fingerprint() == parse_config(make_config()).fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    "example",
    sorted(p for p in EXAMPLES.rglob("*.yaml") if "sweeps" not in p.parts),  # sweep files: tests/test_sweep.py
    ids=lambda p: str(p.relative_to(EXAMPLES)),
)
def test_every_example_config_is_valid_and_its_paths_exist(example):
    from pathlib import Path

    config = load_config(example)
    assert Path(config.data.path).is_file()
    if config.model.name_or_path not in PACKAGED_MODELS:
        assert Path(config.model.name_or_path, "config.json").is_file()
