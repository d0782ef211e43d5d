"""
The test and measurement harness of taskoffload: the load drivers
(``python -m harness.bench SCENARIO``), the fault suite (``python -m
harness.faults``) and the process-tree wrapper they and the integration tests
share (:mod:`harness.processes`).

It is not part of the distribution: run it from a checkout's root, where
``python -m`` finds it.  The ``twistd`` processes it starts run in directories
of their own, so they use the installed ``taskoffload``.
"""
