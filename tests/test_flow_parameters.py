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


def test_the_default_config_leaves_the_kernel_scale_to_the_data_set():
    """`sngp run` without --config reads conf/default.yaml: two moons keeps the study's 1.0, and a switch
    to digits or a table gets `auto` (DESIGN.md: the default for every data set but two moons)."""
    from flows.cli.common import DEFAULT_CONFIG
    from flows.config import read_config

    assert read_config(DEFAULT_CONFIG).sngp.gp_kernel_scale == 1.0
    assert read_config(DEFAULT_CONFIG, ["dataset=digits"]).sngp.gp_kernel_scale == "auto"
    table = ["dataset=table", "table.path=t.csv", "table.label=y"]
    assert read_config(DEFAULT_CONFIG, table).sngp.gp_kernel_scale == "auto"
    by_hand = read_config(DEFAULT_CONFIG, ["dataset=digits", "sngp.gp_kernel_scale=2"])
    assert by_hand.sngp.gp_kernel_scale == 2.0


def test_a_run_records_only_its_data_sets_section():
    """The MLflow params of a digits run hold digits.*, not the two moons' generator settings (data.*)
    or an unused table section; two moons keeps data.*."""
    digits = load_config(None, ["dataset=digits"]).flat()
    assert "digits.known_classes" in digits and "dataset" in digits
    assert not [k for k in digits if k.startswith(("data.", "table."))], sorted(digits)
    moons = load_config(None).flat()
    assert "data.n_train_per_class" in moons
    assert not [k for k in moons if k.startswith(("digits.", "table."))], sorted(moons)
