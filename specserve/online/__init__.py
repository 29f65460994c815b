"""Online distillation: the traffic log of served requests (``traffic_record``, ``traffic_store``,
``postgres_store``), the trainer that learns the draft from it, and the registry that publishes drafts.
"""
