"""The kftune DAG: prepare_data -> build_prompts -> train -> evaluate -> register.

`kftune run` executes this function locally with kfp.local; `kftune compile` writes it as KFP IR
YAML with the run config as the default of its one parameter, `config`.
"""

from kfp import dsl
from kfp.dsl import Artifact

from kftune.components import build_prompts, evaluate, prepare_data, register, train


@dsl.pipeline(name="kftune", description="Fine-tune a language model and register it in MLflow.")
def kftune_pipeline(config: dict) -> Artifact:
    data = prepare_data(config=config).set_display_name("prepare data")
    prompts = build_prompts(config=config, dataset=data.outputs["dataset"]).set_display_name("build prompts")
    model = train(config=config, prompts=prompts.outputs["prompts"], run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER).set_display_name("train")
    scores = evaluate(config=config, prompts=prompts.outputs["prompts"], model=model.outputs["model"]).set_display_name("evaluate")
    registered = register(
        config=config,
        dataset=data.outputs["dataset"],
        model=model.outputs["model"],
        evaluation=scores.outputs["evaluation"],
        report=scores.outputs["report"],
        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("register")
    return registered.outputs["summary"]
