"""Exports of attribution graphs: Neuronpedia / circuit-tracer JSON, SVG (pure Python), Graphviz DOT/PNG/PDF."""
from .dot import render, to_dot
from .neuronpedia import GRAPH_SCHEMA_PATH, to_neuronpedia, write_neuronpedia
from .svg import to_svg, write_svg

__all__ = ["GRAPH_SCHEMA_PATH", "render", "to_dot", "to_neuronpedia", "to_svg", "write_neuronpedia", "write_svg"]
