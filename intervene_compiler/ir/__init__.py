"""The intervention graph (IR): nodes, sites, printer, verifier, serialization. Imports only torch and errors."""

from .facts import NO_FACTS, ModelFacts
from .nodes import (
    MUTATING_METHODS,
    Graph,
    InvokeRows,
    Node,
    Op,
    ParamRef,
    Ref,
    Site,
    SiteKind,
    is_mutation,
    map_args,
    prepend,
    saved_ids,
    structure_tuple,
)
from .printer import format_graph, format_node, format_site
from .serialize import dumps, from_data, loads, structure_key, to_data
from .targets import display_name, is_pure, resolve_target, target_name
from .verifier import verify

__all__ = [
    "MUTATING_METHODS",
    "NO_FACTS",
    "Graph",
    "InvokeRows",
    "ModelFacts",
    "Node",
    "Op",
    "ParamRef",
    "Ref",
    "Site",
    "SiteKind",
    "display_name",
    "dumps",
    "format_graph",
    "format_node",
    "format_site",
    "from_data",
    "is_mutation",
    "is_pure",
    "loads",
    "map_args",
    "prepend",
    "resolve_target",
    "saved_ids",
    "structure_key",
    "structure_tuple",
    "target_name",
    "to_data",
    "verify",
]
