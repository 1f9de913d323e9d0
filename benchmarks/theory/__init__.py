"""The claims of *When is Task Vector Provably Effective for Model Editing?* (Li et al., ICLR 2025),
measured on the paper's conceptual setting with task arithmetic done through a tvbase store.

``python -m benchmarks.theory.run [--out benchmarks/results] [--quick]``; see ``run.py``.
"""
