"""Benchmarks of specserve against itself and HF transformers: `specserve bench latency|throughput|serve|kernel`.

`options` holds the flags and their --quick presets (light: the CLI imports it to build its parser),
`prompts` the Spec-Bench prompt set, `systems` the timed systems, `acceptance` the acceptance
statistics and the formula's prediction, `report` tables, JSON and plots; `latency`, `throughput`,
`serve` (with `local_server` and `load`) and `kernel` are the four benchmarks.
Benchmarks print ratios measured side by side in one run; nothing here asserts a speed.
"""
