"""eliminate-dead-code: remove nodes and initializers no graph output depends on.

Graph inputs are kept even when unused: they are the model's interface.
"""
from __future__ import annotations

from optc.ir.graph import GraphEditor
from optc.ir.liveness import may_have_dead_code
from optc.ir.model import Model
from optc.passes.framework import NoOptions, Pass, PassContext, PassResult, register_pass


@register_pass("eliminate-dead-code")
class EliminateDeadCode(Pass[NoOptions]):
    """Drop nodes whose outputs reach no graph output, and unused initializers (exact)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not may_have_dead_code(model):  # no graph import for nothing
            return PassResult(model, modified=False, stats={"nodes_removed": 0, "initializers_removed": 0})
        editor = GraphEditor(model)
        before_nodes = editor.signature()
        before_inits = model.initializer_names
        editor.remove_dead_code()
        used = {t.name for n in editor.nodes for t in n.inputs} | {t.name for t in editor.outputs}
        dead_inits = sorted(before_inits - used)
        removed_nodes = len(before_nodes) - len(editor.nodes)
        if removed_nodes == 0 and not dead_inits:
            return PassResult(model, modified=False, stats={"nodes_removed": 0, "initializers_removed": 0})
        return PassResult(editor.commit(), modified=True, stats={"nodes_removed": removed_nodes, "initializers_removed": len(dead_inits)})
