"""The kftune DAG: resolve_config -> fingerprint_data -> prepare_data -> build_prompts -> train -> evaluate -> register.

`kftune run` executes it locally with kfp.local; `kftune compile` writes it as KFP IR YAML. Its
parameters, all defaulting to the compiled config's values so each run can override them: `config` (the
run config), the run form (the fields people change per run, named and typed, `kftune.kube.run_form`;
resolve_config writes those a run changed into `config`), and the placement of each kind of step pod
(CPU/memory requests, node selector, tolerations of `steps`, `train` and `evaluate`, the PVC
`volume_claim`, `kftune.kube.tasks`).

On Kubeflow Pipelines every task but fingerprint_data may be served from KFP's cache; fingerprint_data
always runs and its output keys prepare_data's cache, so a scheduled run over changed data retrains
(`kftune.data.fingerprint`).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from kftune.components import build_prompts, evaluate, fingerprint_data, prepare_data, register, resolve_config, train
from kftune.kube.run_form import RUN_FORM, run_form_arguments
from kftune.kube.settings import ClusterSection
from kftune.kube.tasks import configure_task, placement_arguments


def build_pipeline(cluster: ClusterSection, compiled_form: dict | None = None):
    """The pipeline function; `cluster` fixes what KFP cannot take per run (GPUs, mount path, secrets).
    `compiled_form`: the run form's defaults, against which resolve_config tells what a run changed
    (None: compare with the run's own config, which a local run passes unchanged)."""

    @dsl.pipeline(name="kftune", description="Fine-tune a language model and register it in MLflow.")
    def kftune_pipeline(
        config: dict,
        steps_cpu: str,
        steps_memory: str,
        steps_node_selector: dict,
        steps_tolerations: list,
        train_cpu: str,
        train_memory: str,
        train_node_selector: dict,
        train_tolerations: list,
        evaluate_cpu: str,
        evaluate_memory: str,
        evaluate_node_selector: dict,
        evaluate_tolerations: list,
        volume_claim: str,
        base_model: str,
        data_path: str,
        template: str,
        method: str,
        method_options: dict,
        learning_rate: float,
        epochs: int,
        batch_size: int,
        workers: int,
        gpu_nodes: int,
        gpus_per_node: int,
        zero_stage: int,
        registered_model_name: str,
        gate_metric: str,
        gate_margin: float,
    ) -> Artifact:
        names = placement_arguments(cluster)
        placement = {
            name: value for name, value in locals().items() if name in names
        }  # the channels, by parameter name
        form = {name: value for name, value in locals().items() if name in RUN_FORM}

        def step(task, group="steps", **options):
            return configure_task(task, group, cluster, placement, **options)

        resolved = step(
            resolve_config(config=config, compiled_form=compiled_form or {}, **form).set_display_name("run settings")
        )
        config = resolved.outputs["config"]

        fingerprint = step(
            fingerprint_data(config=config).set_display_name("fingerprint data").set_caching_options(False)
        )
        lineage_sources(resolved.outputs, fingerprint.output)
        data = step(prepare_data(config=config, data_fingerprint=fingerprint.output).set_display_name("prepare data"))
        prompts = step(build_prompts(config=config, dataset=data.outputs["dataset"]).set_display_name("build prompts"))
        model = step(
            train(
                config=config,
                prompts=prompts.outputs["prompts"],
                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                volume_claim=volume_claim,
            ).set_display_name("train"),
            "train",
            uses_mlflow=True,  # a config's sweep logs its trials as MLflow runs from this step
            retries=cluster.retries.train_step,
        )
        scores = step(
            evaluate(config=config, prompts=prompts.outputs["prompts"], model=model.outputs["model"]).set_display_name(
                "evaluate"
            ),
            "evaluate",
        )
        registered = step(
            register(
                config=config,
                dataset=data.outputs["dataset"],
                model=model.outputs["model"],
                evaluation=scores.outputs["evaluation"],
                report=scores.outputs["report"],
                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ).set_display_name("register"),
            uses_mlflow=True,
            retries=cluster.retries.register_step,
        )
        return registered.outputs["summary"]

    return kftune_pipeline


def lineage_sources(resolved, data_fingerprint) -> None:
    """The data source and the base model as artifacts in KFP's metadata, for the lineage view. They are not
    inputs of the steps: KFP's launcher downloads every input artifact from its object store before a step
    starts (and fails on a volume path, which is no bucket URI), while the steps read data and models where
    they are. The steps' own artifacts name them too (`source`, `base_model` in their metadata)."""
    dsl.importer(
        artifact_uri=resolved["data_source"],
        artifact_class=Dataset,
        metadata={"role": "training data", "fingerprint": data_fingerprint},
    ).set_display_name("data source")
    dsl.importer(
        artifact_uri=resolved["base_model"], artifact_class=Model, metadata={"role": "base model"}
    ).set_display_name("base model")


def pipeline_arguments(config) -> dict:
    """Every pipeline parameter's value for a validated RunConfig: the compiled defaults, and a run's arguments."""
    from kftune.config import config_to_dict

    values = config_to_dict(config)
    return {"config": values, **placement_arguments(config.cluster), **run_form_arguments(values)}


def compile_pipeline(config, output: str) -> str:
    """Write the KFP IR for a validated RunConfig, its values the parameters' defaults; refuses data, model or
    template paths the cluster's pods cannot read (`kftune.kube.locations`)."""
    from kfp import compiler

    from kftune.kube.locations import check_pods_can_read

    check_pods_can_read(config)

    arguments = pipeline_arguments(config)
    compiled_form = {name: arguments[name] for name in RUN_FORM}
    compiler.Compiler().compile(build_pipeline(config.cluster, compiled_form), output, pipeline_parameters=arguments)
    return output
