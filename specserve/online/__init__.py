"""Online distillation: the trainer that learns the draft from the traffic log (``specserve.traffic``), and
the registry that publishes the drafts it makes.
"""
