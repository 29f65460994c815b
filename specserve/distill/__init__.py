"""Offline draft distillation: train a small draft to imitate the verifier (`specserve distill`).

`data` reads prompts and collects the verifier's responses, `student` builds and saves the draft,
`losses` holds the divergences, `trainer` runs the loop (one process or many under torchrun).
"""
