"""polysketch_eval: evaluations of a served polysketch model over its gRPC API.

`python3 -m polysketch_eval perplexity|passkey` (cli.py; docs/evaluation.md). The package imports
nothing here: train/train.py imports `polysketch_eval.retrieval` (the shared passkey format) without
gRPC or the generated stubs.
"""
