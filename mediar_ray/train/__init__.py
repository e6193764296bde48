"""Training MEDIAR-Former on Ray Train.

:mod:`.config` (validated run configs), :mod:`.stream` (each epoch's sampled batches as a
Ray Dataset), :mod:`.loop` (the TorchTrainer driver and the per-worker DDP loop),
:mod:`.loss`, :mod:`.checkpoint` and :mod:`.validate` (held-out F1).
"""
