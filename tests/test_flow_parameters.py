"""The flows take every config section as a parameter: a section missing from a flow's signature
would be silently dropped by Prefect (a digits config would quietly run on two moons)."""

import inspect

from flows.cli.common import flow_kwargs
from flows.config import PipelineConfig, load_config
from flows.pipeline import uncertainty_pipeline
from flows.retrain import retrain


def test_pipeline_flow_accepts_every_section_but_retrain():
    params = set(inspect.signature(uncertainty_pipeline.fn).parameters)
    assert set(PipelineConfig.model_fields) - {"retrain"} <= params


def test_retrain_flow_accepts_every_section():
    assert set(PipelineConfig.model_fields) <= set(inspect.signature(retrain.fn).parameters)


def test_cli_passes_the_dataset_to_the_flow():
    config = load_config(None, ["dataset=digits", "sngp.gp_kernel_scale=64"])
    kwargs = flow_kwargs(config, uncertainty_pipeline)
    assert kwargs["dataset"] == "digits"
    assert kwargs["sngp"].gp_kernel_scale == 64
