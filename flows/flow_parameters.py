"""The config as flow parameters, declared once for the flows that run a whole config (uncertainty-pipeline,
retrain): one parameter per PipelineConfig field, with the field's name, type and default. A deployment,
the Prefect UI and `prefect deployment run --param` can so set any section, and a field added to the
config is a parameter of both flows at once (a section missing from a flow's parameters would be
silently dropped: a digits config would quietly run on two moons).

Prefect reads a flow's parameters from its function's signature (`inspect.signature`: the UI form, the
deployment's parameter schema, the checks of a run's parameters), and `inspect.signature` returns a
function's `__signature__` when it has one: `config_parameters` sets it, and the function receives the
sections as `**sections`, for flows.config.config_from_flow_parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic.fields import FieldInfo

from flows.config import PipelineConfig

FlowFunction = TypeVar("FlowFunction", bound=Callable[..., Any])


def config_parameters(without: Iterable[str] = ()) -> Callable[[FlowFunction], FlowFunction]:
    """Decorator (under @flow) for `def f(own parameters..., **sections)`: its signature becomes its own
    parameters followed by one per PipelineConfig field but those named in `without`."""

    def declare(fn: FlowFunction) -> FlowFunction:
        own = inspect.signature(fn, eval_str=True)  # real types, as Prefect's schema needs them
        kept = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fields = PipelineConfig.model_fields
        sections = [field_parameter(name, field) for name, field in fields.items() if name not in without]
        fn.__signature__ = own.replace(parameters=[*kept, *sections])  # type: ignore[attr-defined]
        return fn

    return declare


def field_parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """A config field as a flow parameter; a field whose default is computed (methods: every method)
    takes None for that default."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    if field.default_factory is not None:
        return inspect.Parameter(name, kind, default=None, annotation=field.annotation | None)
    return inspect.Parameter(name, kind, default=field.default, annotation=field.annotation)
