"""Training MEMatte the published way (BATR): data pipeline (:mod:`.data`), optimiser and
schedule (:mod:`.optim`), initialisation (:mod:`.init`), the loop (:mod:`.engine`) and the
``mematte train`` command (:mod:`.command`, :mod:`.run`).

Nothing is imported here: ``mematte --help`` imports :mod:`.command` and must not wait for
torch.
"""
