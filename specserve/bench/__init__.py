"""Benchmarks of specserve against itself and HF transformers: `specserve bench latency|throughput|serve|kernel`.

`options` holds the flags and their --quick presets (light: the CLI imports it to build its parser),
`report` tables, JSON and plots; `latency`, `throughput`, `serve` (with `local_server` and `load`) and
`kernel` are the four benchmarks. The prompt set, the timed systems and the acceptance statistics are
`specserve.evaluation`'s (held-out draft evaluation uses them too).
Benchmarks print ratios measured side by side in one run; nothing here asserts a speed.
"""
