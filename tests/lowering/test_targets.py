"""Targets by name and their options: what a recipe or the command line may say."""

from __future__ import annotations

import pytest

from graphpress.lowering.rules import RuleTable, TargetError
from graphpress.lowering.targets import TARGETS, parse_option, register_target, target_options, target_rules


def test_options_reach_the_rule_table() -> None:
    table = target_rules("onnxruntime", {"kernel": "int8"})
    assert isinstance(table, RuleTable) and table.rules
    assert target_options("onnxruntime") == ["kernel", "accuracy_level", "fp16_scales"]


@pytest.mark.parametrize(("name", "options", "message"), [
    ("tensorrt", {}, "unknown target 'tensorrt' \\(known: onnx-qdq, onnxruntime\\)"),
    ("onnxruntime", {"kernal": "int8"}, "target onnxruntime has no option 'kernal' \\(options: kernel, "),
    ("onnxruntime", {"kernel": "int4"}, "kernel must be one of nbits, int8, not 'int4'"),
    ("onnxruntime", {"fp16_scales": "yes"}, "fp16_scales must be true or false"),
    ("onnx-qdq", {"opset": 20}, "opset must be one of 21, 22, 23, not 20"),
])
def test_unknown_targets_options_and_values_are_named(name: str, options: dict, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        target_rules(name, options)


def test_command_line_options_are_read_as_yaml() -> None:
    assert parse_option("kernel=int8") == ("kernel", "int8")
    assert parse_option("accuracy_level=0") == ("accuracy_level", 0)
    assert parse_option("fp16_scales=false") == ("fp16_scales", False)
    with pytest.raises(TargetError, match="must look like key=value"):
        parse_option("int8")


def test_a_registered_target_is_found_by_name() -> None:
    register_target("plain_onnx", lambda: RuleTable())
    try:
        assert target_rules("plain_onnx").rules == ()
        with pytest.raises(TargetError, match="has no option 'kernel'"):
            target_rules("plain_onnx", {"kernel": "int8"})
    finally:
        del TARGETS["plain_onnx"]
