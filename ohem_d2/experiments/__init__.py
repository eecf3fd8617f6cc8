"""Baseline-versus-OHEM comparisons: the runner (``runner``; its yacs/LazyConfig differences in
``config_kinds``), the report with paired statistics (``report``, ``paired``, ``lookalikes``), the
side-by-side mining pictures (``mining_pictures``) and the training-step benchmark (``benchmark``).
The arms themselves are :mod:`ohem_d2.arms`."""
