"""The user-facing tools, each runnable as ``python -m peco_scale.tools.<name>`` (``--help`` for its
arguments). Each exits 0 on success and, on bad input, prints one ``error:`` line to stderr and exits 2.

- ``export``: a stage-2 or fine-tuning checkpoint -> a timm-loadable ``.safetensors`` (``create_timm_model``).
- ``probe``: linear probe of an exported backbone, or codeword probe of a tokenizer -> accuracies (JSON).
- ``plan``: analytic FLOPs and per-GPU memory of MIM pre-training under ZeRO -> the largest micro-batch.
- ``tokenize``: a folder of images + a tokenizer artifact -> token grids in an ``.npz``.
- ``collect``: run or benchmark folders of a sweep -> one markdown table (or one line per run).
- ``plot``: a run's ``metrics.jsonl`` -> ``metrics.png``.
- ``bench_step``: one synthetic pre-training step timed on one device -> JSON rows (images/s, MFU, memory).

The old names (``python -m peco_scale.export`` etc.) remain as aliases of these modules.
"""
