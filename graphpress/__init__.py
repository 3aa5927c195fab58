"""graphpress: compiler passes that make PyTorch models smaller and faster.

    program = graphpress.capture(model, example_inputs)           # torch.export -> Program
    program, records = graphpress.run_pipeline(program, passes)   # passes from PASSES or a recipe
    graphpress.export_onnx(program, "model.onnx")                 # lowered by rule tables, checked

The names below are imported on first use, so ``import graphpress`` (and the CLI's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "capture": "graphpress.capture",
    "CaptureError": "graphpress.capture",
    "Program": "graphpress.program",
    "run_pipeline": "graphpress.runner",
    "PipelineError": "graphpress.runner",
    "PASSES": "graphpress.passes",
    "Pass": "graphpress.passes",
    "PassContext": "graphpress.passes",
    "PassResult": "graphpress.passes",
    "PassError": "graphpress.passes",
    "Selection": "graphpress.passes",
    "register_pass": "graphpress.passes",
    "Recipe": "graphpress.recipes",
    "load_recipe": "graphpress.recipes",
    "recipe_from_dict": "graphpress.recipes",
    "load_plugin": "graphpress.recipes",
    "export_onnx": "graphpress.lowering.onnx",
    "LoweringError": "graphpress.lowering.onnx",
    "Rule": "graphpress.lowering.rules",
    "RuleTable": "graphpress.lowering.rules",
    "TargetError": "graphpress.lowering.rules",
    "onnxruntime_rules": "graphpress.lowering.onnxruntime_rules",
    "target_rules": "graphpress.lowering.targets",
    "register_target": "graphpress.lowering.targets",
    "compress": "graphpress.compress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'graphpress' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
