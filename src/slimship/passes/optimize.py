"""ONNX Runtime graph optimisation as its own pass, with the transformer fusions for BERT-family models.

Transformer models first go through ``onnxruntime.transformers.optimizer`` (SkipLayerNormalization,
BiasGelu, Attention where the export allows it), then ONNX Runtime's own graph optimiser at the
chosen level is applied offline and saved. ``extended`` is the highest level that stays portable;
``all`` adds layout transformations specific to this CPU and is recorded as such.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from slimship.errors import CompressionError, VerificationError
from slimship.measure.verify import VerificationReport, VerifyThresholds
from slimship.passes.base import Pass, PassConfig

if TYPE_CHECKING:
    from slimship.candidate import Candidate
    from slimship.workload import Workload


#: from most to least aggressive: a level whose graph fails verification steps down to the next
_LEVELS = ("all", "extended", "basic")


class GraphOptimizeConfig(PassConfig):
    level: Literal["basic", "extended", "all"] = Field(
        default="extended",
        description="ONNX Runtime graph optimisation level saved into the artifact: basic, extended (portable), all (this CPU only); a level whose graph fails verification steps down to the next lower one (recorded in the candidate's notes)",
    )
    transformer_fusion: Literal["auto", "on", "off"] = Field(
        default="auto", description="transformer fusions: auto = on for BERT-family workloads"
    )
    model_type: str = Field(
        default="bert", description="model type for ORT's transformer optimizer (bert, roberta, ...)"
    )
    num_heads: int = Field(
        default=0,
        ge=0,
        description="attention heads / hidden size for fusion; 0 = take them from the workload",
    )
    hidden_size: int = Field(
        default=0, ge=0, description="hidden size for the transformer fusions; 0 = take it from the workload"
    )
    verify: VerifyThresholds = Field(
        default=VerifyThresholds(),
        description="thresholds the optimised graph must meet against its parent on real inputs; the pass fails when they don't hold",
    )
    verify_samples: int = Field(
        default=48,
        ge=1,
        description="number of evaluation samples the output is verified on against the parent (on top of a few fixed-shape batches), e.g. 48",
    )


class GraphOptimizePass(Pass[GraphOptimizeConfig]):
    name: ClassVar[str] = "optimize"
    summary: ClassVar[str] = (
        "ONNX Runtime graph optimisation (+ transformer fusions), verified against its parent"
    )
    config_cls = GraphOptimizeConfig
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"

    @staticmethod
    def _optimise_verified(
        stage: Path,
        src: Path,
        out: Path,
        levels: list[str],
        workload: Workload,
        config: GraphOptimizeConfig,
        threads: int,
        info: dict[str, Any],
    ) -> tuple[VerificationReport, str]:
        """Optimise at the first of ``levels`` whose graph verifies against the parent; each level that fails
        verification is recorded in ``info["notes"]`` and the next lower one tried."""
        import onnxruntime as ort

        from slimship.measure.verify import compare_outputs, verification_batches
        from slimship.runtime.ort_backend import OrtRuntime, describe_ort_error, session_options

        batches = verification_batches(workload, config.verify_samples)
        parent_rt = OrtRuntime(src, threads, graph_level="disable")
        failed: list[str] = []
        for level in levels:
            try:
                ort.InferenceSession(
                    str(stage),
                    session_options(threads, level, optimized_path=out),
                    providers=["CPUExecutionProvider"],
                )
            except Exception as err:
                raise CompressionError(
                    f"ONNX Runtime could not optimise {src} at level {level!r}: {describe_ort_error(err, stage)}"
                ) from err
            report = compare_outputs(
                parent_rt, OrtRuntime(out, threads, graph_level="disable"), batches, config.verify
            )
            if report.passed:
                if failed:
                    info["requested_level"] = levels[0]
                    info["notes"].append(f"stepped down to level {level!r}: " + "; ".join(failed))
                return report, level
            out.unlink(missing_ok=True)
            failed.append(f"level {level!r} failed verification ({'; '.join(report.failures)})")
        raise VerificationError(
            "the optimised graph's outputs disagree with its parent's at every level tried: "
            + "; ".join(failed)
            + ". Pass the unoptimised graph on, or loosen optimize's verify thresholds if the figures are acceptable",
            report=report.to_json(),
        )

    def run(
        self, candidate: Candidate, workload: Workload, config: GraphOptimizeConfig, out_dir: Path
    ) -> Candidate:
        import onnx

        from slimship.candidate import new_candidate
        from slimship.machine import default_threads
        from slimship.passes._onnx_graph import op_histogram

        threads = default_threads()
        src = candidate.artifact_path
        out = out_dir / "model.onnx"
        info: dict[str, Any] = {"level": config.level, "notes": []}
        t0 = time.perf_counter()
        fuse = config.transformer_fusion == "on" or (
            config.transformer_fusion == "auto" and workload.model_info.family == "bert"
        )
        stage = src
        if fuse:
            num_heads = config.num_heads or (workload.model_info.num_heads or 0)
            hidden = config.hidden_size or (workload.model_info.hidden_size or 0)
            if not num_heads or not hidden:
                raise CompressionError(
                    f"transformer fusion needs num_heads and hidden_size; workload {workload.name} doesn't say. "
                    "Set them in GraphOptimizeConfig, e.g. num_heads=12, hidden_size=384."
                )
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                fused = optimize_model(
                    str(src),
                    model_type=config.model_type,
                    num_heads=num_heads,
                    hidden_size=hidden,
                    opt_level=0,
                )
            except Exception as err:
                raise CompressionError(
                    f"ONNX Runtime's transformer optimizer failed on {src}: {type(err).__name__}: {err}"
                ) from err
            info["fused_operators"] = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
            if not info["fused_operators"].get("Attention"):
                info["notes"].append(
                    "Attention was not fused: ORT's fusion matches the classic BERT attention subgraph; "
                    "this export's attention layout differs (LayerNorm, SkipLayerNorm and BiasGelu fusions still apply)"
                )
            stage = out_dir / ".fused.onnx"
            fused.save_model_to_file(str(stage))
        levels = list(_LEVELS[_LEVELS.index(config.level) :])
        try:
            report, level = self._optimise_verified(stage, src, out, levels, workload, config, threads, info)
        finally:
            if stage != src:
                Path(stage).unlink(missing_ok=True)
        info["level"] = level
        if level == "all":
            info["notes"].append(
                "level 'all' adds layout optimisations specific to this CPU; the artifact is not portable"
            )
        info["optimize_seconds"] = round(time.perf_counter() - t0, 2)
        info["ops_before"] = op_histogram(onnx.load(str(src), load_external_data=False))
        info["ops_after"] = op_histogram(onnx.load(str(out), load_external_data=False))
        info["verification"] = report.to_json()
        return new_candidate(
            out_dir,
            name="optimized",
            format="onnx",
            artifact="model.onnx",
            workload=workload,
            parent=candidate,
            pass_name=self.name,
            pass_config=config.to_json_dict(),
            info=info,
        )
