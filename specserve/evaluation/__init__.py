"""What measuring speculation needs, shared by held-out evaluation (`specserve distill --eval-only`) and the benchmarks.

`prompts` is the Spec-Bench prompt set, `systems` the systems run on it (our engine step by step, logging each
step's drafted and accepted tokens; HF transformers), `acceptance` the acceptance statistics of such runs and the
speedup Leviathan et al.'s formula predicts from them. Knows nothing about training, serving, or how a benchmark
times and reports (`specserve.bench` does that).
"""
