"""Exports of attribution graphs: Neuronpedia / circuit-tracer JSON, Graphviz DOT/SVG/PNG."""
from .dot import render, to_dot
from .neuronpedia import GRAPH_SCHEMA_PATH, to_neuronpedia, write_neuronpedia

__all__ = ["GRAPH_SCHEMA_PATH", "render", "to_dot", "to_neuronpedia", "write_neuronpedia"]
