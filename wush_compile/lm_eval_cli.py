"""lm-evaluation-harness's own command line with wush checkpoints loadable:

    python -m wush_compile.lm_eval_cli run --model hf --model_args pretrained=DIR --tasks TASKS [lm_eval flags]

lm_eval 0.4 has no plugin or entry-point mechanism for models (its model table is fixed in
``lm_eval.models.MODEL_MAPPING``), and transformers knows quant_method "wush" only once wush_compile is imported. This
launcher imports wush_compile (registering the quantizer) and hands every argument to lm_eval's CLI unchanged, so
``--model hf`` loads a wush checkpoint with its FP4 layers. Plain ``lm_eval --model hf`` on a wush checkpoint fails
loudly (a shape-mismatch guard), it never evaluates random weights. ``wush eval DIR --tasks ...`` is the short form.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise SystemExit(f"lm-evaluation-harness is not installed ({exc}): pip install 'wush_compile[eval]'") from exc

    import wush_compile  # noqa: F401  (registers quant_method "wush" with transformers)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
