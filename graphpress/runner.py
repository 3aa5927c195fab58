"""The pipeline runner: runs passes in order, records what each did, and verifies as it goes.

In verify mode each pass's graph is linted and the program is run on the sample batch; each of its outputs
is compared with the previous stage's (max abs / rel error, SQNR). An exact pass that moves outputs by more than
``exact_tolerance`` (max relative error), or any NaN/Inf, stops the pipeline with a PipelineError naming the
pass and the passes before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from graphpress.errors import describe
from graphpress.metrics import compare_outputs
from graphpress.passes.base import Pass, PassContext
from graphpress.program import Program

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A pass failed or broke the program; the message names it and the passes that ran before."""


@dataclass
class PassRecord:
    name: str
    exact: bool
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    stats: dict[str, Any] = field(default_factory=dict)
    # error against the previous stage on the sample batch (verify mode only)
    error: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(
    program: Program,
    passes: Sequence[Pass],
    *,
    verify: bool = True,
    calibration: list[tuple[torch.Tensor, ...]] | None = None,
    exact_tolerance: float = 1e-4,
    in_place: bool = False,
    progress: bool = False,
) -> tuple[Program, list[PassRecord]]:
    """Run ``passes`` over ``program``; return the rewritten program and one record per pass.

    The input program is left untouched unless ``in_place``.
    """
    program = program if in_place else program.clone()
    ctx = PassContext(program=program, calibration=list(calibration or []))
    records: list[PassRecord] = []
    previous = _run(program) if verify else None
    if previous is not None:
        _check_finite(previous, "the captured program (before any pass)", [])
    iterator: Any = passes
    if progress:
        from tqdm import tqdm

        iterator = tqdm(passes, desc="passes", unit="pass", disable=None, leave=False)
    for p in iterator:
        if not isinstance(p, Pass):
            hint = f": write {p.__name__}()" if isinstance(p, type) and issubclass(p, Pass) else ""
            raise PipelineError(f"run_pipeline on {program.name}: {describe(p)} is not a pass instance{hint}")
        done = [r.name for r in records]
        before = (program.num_nodes(), program.num_parameters(), program.num_bytes())
        start = time.perf_counter()
        try:
            result = p(program.gm, ctx)
        except Exception as e:
            raise PipelineError(f"pass {p.name} failed on {program.name} (after {_list(done)}): {e}") from e
        seconds = time.perf_counter() - start
        program.gm = result.gm
        record = PassRecord(
            name=p.name,
            exact=p.exact,
            modified=result.modified,
            seconds=seconds,
            nodes_before=before[0],
            nodes_after=program.num_nodes(),
            params_before=before[1],
            params_after=program.num_parameters(),
            bytes_before=before[2],
            bytes_after=program.num_bytes(),
            stats=result.stats,
        )
        records.append(record)
        brief = {k: (len(v) if isinstance(v, dict) else v) for k, v in result.stats.items()}
        log.info("%s: %.2fs, modified=%s, %s", p.name, seconds, result.modified, brief)
        if not verify:
            continue
        try:
            program.gm.graph.lint()
        except Exception as e:
            raise PipelineError(f"pass {p.name} left an invalid graph in {program.name}: {e}") from e
        out = _run(program)
        _check_finite(out, f"pass {p.name}", done)
        record.error, worst = compare_outputs(previous, out, program.output_names)
        if p.exact and record.error["max_rel"] > exact_tolerance:
            raise PipelineError(
                f"exact pass {p.name} changed output {worst} of {program.name}: max relative error "
                f"{record.error['max_rel']:.3g} > {exact_tolerance:g} (SQNR {record.error['sqnr_db']:.1f} dB; "
                f"passes before it: {_list(done)}). This is a bug in the pass: report it, and drop the pass "
                "from the recipe to continue."
            )
        previous = out
    return program, records


def _run(program: Program) -> list[torch.Tensor]:
    """Every output of the program on its sample batch."""
    return program.outputs(*program.example_inputs)


def _check_finite(outs: list[torch.Tensor], where: str, done: list[str]) -> None:
    bad = sum((~torch.isfinite(o)).sum().item() for o in outs if o.is_floating_point())
    if bad:
        raise PipelineError(f"{where} produced {bad} NaN/Inf outputs (passes before it: {_list(done)})")


def _list(names: list[str]) -> str:
    return ", ".join(names) if names else "none"

