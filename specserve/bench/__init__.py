"""Benchmarks of specserve against itself and HF transformers: `specserve bench latency|throughput`.

`options` holds the flags (light: the CLI imports it to build its parser), `prompts` the Spec-Bench
prompt set, `systems` the timed systems, `acceptance` the acceptance statistics and the formula's
prediction, `report` tables, JSON and plot, `latency` and `throughput` the two benchmarks.
Benchmarks print ratios measured side by side in one run; nothing here asserts a speed.
"""
