"""Compiling for a cluster refuses data, model and template paths that only the submitting machine has
(`kftune.kube.locations`): every such field at once, with the options that would work."""

from __future__ import annotations

import yaml

from conftest import CLUSTER, CLUSTER_RUN_CONFIG, EXAMPLES, ON_VOLUME
from kftune.cli import main
from kftune.config import parse_config
from kftune.kube.locations import local_only_locations
from kftune.prompts.templates import resolve_template


def test_compiling_the_local_example_names_each_local_path_and_the_options(tmp_path, capsys):
    assert main(["compile", str(EXAMPLES / "sst2-minilm-lora.yaml"), "-o", str(tmp_path / "p.yaml")]) == 2
    error = capsys.readouterr().err
    assert "the config names files the cluster's pods cannot read" in error
    assert f"data.path: {EXAMPLES / 'data' / 'sst2_train_16k.tsv'} is on this machine" in error
    assert f"data.split.test: {EXAMPLES / 'data' / 'sst2_dev.tsv'} is on this machine" in error
    assert "set cluster.volume: a PVC every step mounts), or an s3:// URI" in error
    assert not (tmp_path / "p.yaml").exists()


def test_a_local_model_folder_and_template_file_are_refused_with_the_packaged_choices(make_config, tmp_path):
    config = parse_config(
        make_config(cluster=CLUSTER, data=ON_VOLUME, model={"name_or_path": str(tmp_path / "my-model")})
    )
    with_template_file = config.model_copy(
        update={"prompt": config.prompt.model_copy(update={"template": str(tmp_path / "mine.yaml")})}
    )
    problems = local_only_locations(with_template_file)
    assert [problem.split(":")[0] for problem in problems] == ["model.name_or_path", "prompt.template"]
    assert (
        "a path under cluster.volume.mount_path (/data)" in problems[0]
        and "a packaged model (" in problems[0]
        and "minilm-l6" in problems[0]
    )
    assert "a packaged template (" in problems[1] and "plain" in problems[1]


def test_volume_paths_uris_and_packaged_names_are_reachable(make_config):
    assert local_only_locations(parse_config(make_config(cluster=CLUSTER, data=ON_VOLUME))) == []
    remote = {"path": "s3://bucket/train.tsv", "split": {"test": "s3://bucket/dev.tsv"}}
    assert local_only_locations(parse_config(make_config(data=remote))) == []
    outside = {"path": "/datasets/train.tsv", "split": {"test": 0.1}}
    assert local_only_locations(parse_config(make_config(cluster=CLUSTER, data=outside)))[0].startswith(
        "data.path: /datasets/train.tsv"
    )


def test_a_set_override_on_a_compiled_package_is_checked_too(tmp_path, capsys):
    package = tmp_path / "p.yaml"
    assert main(["compile", str(CLUSTER_RUN_CONFIG), "-o", str(package)]) == 0
    assert (
        main(
            [
                "submit",
                str(package),
                "--host",
                "http://kfp.invalid",
                "--dry-run",
                "--set",
                "data.path=/home/me/train.tsv",
            ]
        )
        == 2
    )
    assert "data.path: /home/me/train.tsv is on this machine" in capsys.readouterr().err


def test_a_user_template_file_travels_inside_the_compiled_config(tmp_path):
    """The pods render with the template's contents, carried in the compiled config, not with the file."""
    (tmp_path / "review.yaml").write_text(
        'description: Reviews.\ntasks: [sequence_classification]\nprompt: "Review: {text}"\n'
    )
    config = yaml.safe_load(CLUSTER_RUN_CONFIG.read_text())
    config["prompt"]["template"] = "review.yaml"  # relative to the config file
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    package = tmp_path / "p.yaml"
    assert main(["compile", str(tmp_path / "run.yaml"), "-o", str(package)]) == 0
    (tmp_path / "review.yaml").unlink()
    ir = next(yaml.safe_load_all(package.read_text()))
    compiled = ir["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert compiled["prompt"]["template"]["prompt"] == "Review: {text}"
    assert resolve_template(parse_config(compiled).prompt.template).render({"text": "great"})[0] == (
        "Review: great",
        False,
    )
    assert ir["root"]["inputDefinitions"]["parameters"]["template"]["defaultValue"] == "review.yaml"


def test_general_text_fisher_file_and_reward_function_must_be_on_the_volume(make_config):
    """Files read from a path by a step (no URI reader): on the volume, or refused naming the field."""
    config = parse_config(
        make_config(
            cluster=CLUSTER,
            data=ON_VOLUME,
            eval={"general_text": "/home/me/general.txt"},
            retention={"l2_sp": {"alpha": 0.1}, "general_data": "s3://bucket/general.txt"},
        )
    )
    problems = local_only_locations(config)
    assert [problem.split(":")[0] for problem in problems] == ["eval.general_text", "retention.general_data"]
    assert "is on this machine" in problems[0] and "is a URI; this file is read from a path" in problems[1]
    assert all("s3://" not in problem.split("; use ")[1] for problem in problems)
    on_volume = config.model_copy(
        update={
            "eval": config.eval.model_copy(update={"general_text": "/data/general.txt"}),
            "retention": config.retention.model_copy(update={"general_data": "/data/general.txt"}),
        }
    )
    assert local_only_locations(on_volume) == []
