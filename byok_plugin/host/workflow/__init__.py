"""The JSON workflow format of the reference host engine.

A workflow has a name, a version, declared inputs, blocks keyed by id (``agent``, ``input``,
``condition``, ``tool``, ``output``) and edges. Prompts reference inputs and upstream outputs:
``{{inputs.ticket}}``, ``{{classify.json.category}}``. :func:`load_workflow` checks the document
against the shipped JSON Schema (``byok_plugin/host/schema/workflow.schema.json``, draft 2020-12),
then what a schema cannot express (cycles, references to blocks that are not upstream, unknown
fields, providers), and raises :class:`WorkflowError` listing every problem with its JSON path.
"""

from byok_plugin.host.workflow.build import (
    OUTPUT_FIELDS,
    bind_inputs,
    check_models,
    load_workflow,
    parse_workflow,
)
from byok_plugin.host.workflow.document import workflow_schema
from byok_plugin.host.workflow.errors import InputsError, Problem, WorkflowError, json_path
from byok_plugin.host.workflow.model import (
    AgentBlock,
    AgentTool,
    Block,
    ConditionBlock,
    Edge,
    InputBlock,
    InputSpec,
    KeyRef,
    OutputBlock,
    ToolBlock,
    WebSearch,
    Workflow,
)
from byok_plugin.host.workflow.providers import (
    MODEL_PROVIDERS,
    TOOL_PROVIDERS,
    WEB_SEARCH_TOOLS,
    infer_provider,
)
from byok_plugin.host.workflow.templates import Ref, RenderError, Template, TemplateSyntaxError

__all__ = [
    "MODEL_PROVIDERS",
    "OUTPUT_FIELDS",
    "TOOL_PROVIDERS",
    "WEB_SEARCH_TOOLS",
    "AgentBlock",
    "AgentTool",
    "Block",
    "ConditionBlock",
    "Edge",
    "InputBlock",
    "InputSpec",
    "InputsError",
    "KeyRef",
    "OutputBlock",
    "Problem",
    "Ref",
    "RenderError",
    "Template",
    "TemplateSyntaxError",
    "ToolBlock",
    "WebSearch",
    "Workflow",
    "WorkflowError",
    "bind_inputs",
    "check_models",
    "infer_provider",
    "json_path",
    "load_workflow",
    "parse_workflow",
    "workflow_schema",
]
