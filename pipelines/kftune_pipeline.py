"""The kftune DAG: prepare_data -> build_prompts -> train -> evaluate -> register.

`kftune run` executes it locally with kfp.local; `kftune compile` writes it as KFP IR YAML with
the run config as the default of its one parameter, `config`, and the config's `cluster` section
applied to every task (resources, node selectors, tolerations, volume, secrets).
"""

from kfp import dsl
from kfp.dsl import Artifact

from kftune.components import build_prompts, evaluate, prepare_data, register, train
from kftune.kube.settings import ClusterSection
from kftune.kube.tasks import configure_task


def build_pipeline(cluster: ClusterSection):
    """The pipeline function with `cluster` baked into its tasks (KFP task settings are compile-time)."""

    def step(task):
        return configure_task(task, cluster.steps, cluster)

    @dsl.pipeline(name="kftune", description="Fine-tune a language model and register it in MLflow.")
    def kftune_pipeline(config: dict) -> Artifact:
        data = step(prepare_data(config=config).set_display_name("prepare data"))
        prompts = step(build_prompts(config=config, dataset=data.outputs["dataset"]).set_display_name("build prompts"))
        model = configure_task(
            train(config=config, prompts=prompts.outputs["prompts"], run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER).set_display_name("train"),
            cluster.train, cluster,
        )
        scores = step(evaluate(config=config, prompts=prompts.outputs["prompts"], model=model.outputs["model"]).set_display_name("evaluate"))
        registered = register(
            config=config,
            dataset=data.outputs["dataset"],
            model=model.outputs["model"],
            evaluation=scores.outputs["evaluation"],
            report=scores.outputs["report"],
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("register")
        configure_task(registered, cluster.steps, cluster, uses_mlflow=True)
        return registered.outputs["summary"]

    return kftune_pipeline


def compile_pipeline(config, output: str) -> str:
    """Write the KFP IR for a validated RunConfig: its cluster settings applied, itself the `config` default."""
    from kfp import compiler

    from kftune.config import config_to_dict

    compiler.Compiler().compile(build_pipeline(config.cluster), output, pipeline_parameters={"config": config_to_dict(config)})
    return output
