"""A pass of your own, registered for recipes and the CLI, checked by the runner like any other.

Run it: ``python examples/custom_pass.py``. From a recipe, list this file under ``plugins:`` and use
``- pass: scale_outputs``; from the CLI, ``graphpress compress ... --plugin examples/custom_pass.py``.

The contract (graphpress.passes.base): a pass is a frozen dataclass with a class attribute ``name``, and
``exact`` (True when outputs stay equal up to rounding: the runner then checks it on the sample batch);
``__call__(gm, ctx)`` rewrites the fx graph (in place or a new one) and returns ``PassResult(gm, modified,
stats)``. ``ctx.program`` holds the input and output names and the sample batch, ``ctx.calibration`` the
calibration batches. After surgery, call ``gm.graph.lint()`` and ``gm.recompile()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from graphpress.passes import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class ScaleOutputs(Pass):
    """Multiplies the chosen outputs by ``factor``:  output_i  =>  mul(output_i, factor)."""

    name: ClassVar[str] = "scale_outputs"
    exact: ClassVar[bool] = False  # it changes the outputs (say True, and the runner refuses it)
    factor: float = 2.0
    outputs: tuple[int, ...] = (0,)  # which outputs, by position

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        values = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
        with gm.graph.inserting_before(out):
            for i in self.outputs:
                values[i] = gm.graph.call_function(torch.ops.aten.mul.Tensor, (values[i], self.factor))
        out.args = (type(out.args[0])(values) if isinstance(out.args[0], (tuple, list)) else values[0],)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified=True, stats={"scaled": len(self.outputs)})


def main() -> None:
    from graphpress.capture import capture
    from graphpress.recipes import recipe_from_dict
    from graphpress.runner import run_pipeline

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    program = capture(model, (torch.randn(1, 4),))
    recipe = recipe_from_dict({"passes": [{"pass": "remove_noops"}, {"pass": "scale_outputs", "factor": 3}]})
    scaled, records = run_pipeline(program, recipe.passes)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), 3 * model(x))
    print(f"{records[-1].name}: {records[-1].stats}, SQNR against the stage before {records[-1].error['sqnr_db']:.1f} dB")


if __name__ == "__main__":
    main()
